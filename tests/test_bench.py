"""The benchmark tool (python -m resfused.bench): bad input, records and their context, the
correctness check failing loudly, --compare, plots and progress without their optional
packages. Toy shapes (preset "tiny") and one thread: numbers mean nothing here, only the
tool's behaviour (CONVENTIONS 12: no test asserts a speed)."""
from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from resfused import functional as RF
from resfused.bench import __main__ as cli
from resfused.bench import report, runner
from resfused.bench.cases import PROVIDERS, select_cases
from utils import DEVICES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--threads", "1", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of the whole tiny preset (every level), shared by the record tests."""
    out = tmp_path_factory.mktemp("bench")
    torch.set_num_threads(1)
    n = torch.get_num_threads()
    rc = cli.main(TINY + ["--out", str(out), "--name", "tiny"])
    torch.set_num_threads(n)
    with open(out / "tiny.json") as f:
        record = json.load(f)
    return rc, out, record


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the valid choices, exit 2, nothing written

@pytest.mark.parametrize("argv, choices", [
    (["--level", "op,layer"], "op, block, model"),
    (["--provider", "eager,apex"], ", ".join(PROVIDERS)),
    (["--dtype", "fp64"], "fp32, bf16, fp16"),
    (["--device", "tpu"], "cpu, cuda, cuda:N"),
    (["--case", "vgg16"], "join, bn_relu, apply"),
    (["--preset", "huge"], "'quick', 'full', 'tiny'"),
    (["--mode", "train"], "fwd, fwd_bwd, train_step, inference, saved, max_batch"),
])
def test_bad_choice_exits_2_naming_choices(argv, choices, capsys, tmp_path):
    code, err = _exit_code(TINY[:4] + argv + ["--out", str(tmp_path)], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "invalid choice" in err and choices in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu(capsys, tmp_path):
    code, err = _exit_code(TINY[:4] + ["--device", "cuda", "--out", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no CUDA device is available" in err and "choose from cpu" in err
    assert os.listdir(tmp_path) == []


def test_unavailable_provider_exits_2(capsys, tmp_path):
    code, err = _exit_code(TINY + ["--provider", "resfused[cuda]", "--out", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "resfused[cuda] cannot run on cpu" in err and "choose from eager" in err


def test_preset_that_cannot_fit_exits_2(capsys, tmp_path):
    code, err = _exit_code(TINY + ["--level", "model", "--batch", str(10 ** 8), "--out", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "GiB available" in err and "--batch" in err
    assert os.listdir(tmp_path) == []


def test_unreadable_compare_file_exits_2(capsys, tmp_path):
    code, err = _exit_code(TINY + ["--compare", str(tmp_path / "missing.json"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "argument --compare" in err
    (tmp_path / "bad.json").write_text("{not json")
    code, err = _exit_code(TINY + ["--compare", str(tmp_path / "bad.json"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "not JSON" in err


@pytest.mark.parametrize("content, text", [
    ('{"results": [1, 2]}', "result 0 has no 'case' and 'provider'"),
    ('{"results": [], "context": "x"}', "'context' is not an object"),
    ('{"results": [{"case": "c", "provider": "p", "ms": 1.0, "speedup": "fast"}]}', "speedup is 'fast'"),
])
def test_compare_file_of_another_schema_exits_2_before_the_run(content, text, capsys, tmp_path):
    (tmp_path / "other.json").write_text(content)
    out = tmp_path / "out"
    code, err = _exit_code(TINY + ["--compare", str(tmp_path / "other.json"), "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and text in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv, text", [
    (["--max-time", "nan"], "--max-time: must be a positive number"),
    (["--max-time", "inf"], "--max-time: must be a positive number"),
    (["--provider", ""], "--provider: expected at least one of"),
    (["--case", "join", "--provider", "tv_memeff"], "tv_memeff applies to none of the selected cases"),
    (["--name", "taken"], "taken.csv is a directory"),
])
def test_other_bad_values_exit_2_before_the_run(argv, text, capsys, tmp_path):
    (tmp_path / "taken.csv").mkdir()
    code, err = _exit_code(TINY[:4] + argv + ["--out", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and text in err, err
    assert sorted(os.listdir(tmp_path)) == ["taken.csv"]


def test_records_get_the_umask_mode(tmp_path):
    from resfused.bench import report

    old = os.umask(0o022)
    try:
        report.atomic_write(str(tmp_path / "r.json"), "{}")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "r.json").st_mode & 0o777) == 0o644


def test_command_line_exit_code_and_one_line():
    res = subprocess.run([sys.executable, "-m", "resfused.bench", "--level", "nope"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "resfused-bench: error: argument --level: invalid choice 'nope' (choose from op, block, model) (see --help)"]


def test_list_runs_nothing(capsys, tmp_path):
    assert cli.main(TINY + ["--list", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "op join fwd+bwd fp32 NCHW [2, 8, 5, 5]: eager, resfused[cpu]" in out
    assert os.listdir(tmp_path) == []


def test_interrupted_run_is_never_presented_as_complete(monkeypatch, capsys, tmp_path):
    real = cli.run_case
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(cli, "run_case", interrupt_second)
    assert cli.main(TINY + ["--level", "op", "--out", str(tmp_path), "--no-plot"]) == 130
    assert "INCOMPLETE RUN" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["latest-cpu-tiny-incomplete.csv", "latest-cpu-tiny-incomplete.json",
                                            "latest-cpu-tiny-incomplete.md"]
    with open(tmp_path / "latest-cpu-tiny-incomplete.json") as f:
        record = json.load(f)
    assert record["complete"] is False and record["incomplete_reason"] == "interrupted"
    assert len({r["case"] for r in record["results"]}) == 1 and len(record["cases_not_run"]) == 7


def test_time_budget_marks_the_record_incomplete(capsys, tmp_path):
    rc = cli.main(TINY + ["--level", "op", "--case", "apply", "--max-time", "1e-9", "--out", str(tmp_path),
                          "--no-plot"])
    assert rc == 3
    with open(tmp_path / "latest-cpu-tiny-incomplete.json") as f:
        record = json.load(f)
    assert record["complete"] is False and "--max-time" in record["incomplete_reason"]
    with open(tmp_path / "latest-cpu-tiny-incomplete.md") as f:
        assert "**INCOMPLETE RUN (" in f.read()  # the markdown says so in the file, not only in its name
    assert not os.path.exists(tmp_path / "latest-cpu-tiny.json")
    # a whole run under the same name removes the incomplete leftovers
    assert cli.main(TINY + ["--level", "op", "--case", "apply", "--out", str(tmp_path), "--no-plot"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["latest-cpu-tiny.csv", "latest-cpu-tiny.json", "latest-cpu-tiny.md"]


# ---------------------------------------------------------------------------------------------
# presets keep the cases earlier issues are judged by

def _keys(preset, device_type):
    return {c.key for c in select_cases(preset, device_type)}


@pytest.mark.parametrize("preset", ["quick", "full"])
def test_cpu_presets_keep_the_target_cases(preset):
    keys = _keys(preset, "cpu")
    for fmt in ("nchw", "channels_last"):
        assert f"op:join:fwd_bwd:fp32:{fmt}:32x256x28x28" in keys
    for model in ("resnet50", "densenet121"):
        assert f"model:{model}:saved:fp32:nchw:4x3x224x224" in keys
        assert f"model:{model}:train_step:fp32:nchw:8x3x224x224" in keys
    cases = {c.key: c for c in select_cases(preset, "cpu")}
    dense = cases["model:densenet121:train_step:fp32:nchw:8x3x224x224"]
    run, _ = runner.case_providers(dense, PROVIDERS, torch.device("cpu"), preset, [])
    assert "tv_memeff" in run and "eager" in run


@pytest.mark.parametrize("preset", ["quick", "full"])
def test_cuda_presets_keep_the_target_cases(preset):
    keys = _keys(preset, "cuda")
    assert any(k.startswith("op:join:fwd_bwd:bf16:channels_last:") for k in keys)
    assert any(k.startswith("op:apply:fwd:") for k in keys)
    assert "model:resnet50:train_step:bf16:channels_last:128x3x224x224" in keys
    assert "model:densenet121:train_step:bf16:channels_last:64x3x224x224" in keys
    assert "model:densenet121:max_batch:bf16:channels_last:64x3x224x224" in keys


# ---------------------------------------------------------------------------------------------
# a tiny run: records with their context, the table, plots

def test_tiny_run_writes_complete_records(tiny_run):
    rc, out, record = tiny_run
    assert rc == 0, record.get("failures")
    assert record["complete"] is True and record["passed"] is True
    for key in ("device", "torch", "triton", "cuda", "commit", "date"):
        assert key in record["context"]
    assert {r["level"] for r in record["results"]} == {"op", "block", "model"}
    for row in record["results"]:
        for key in ("dtype", "memory_format", "batch", "shape", "provider", "status"):
            assert key in row
    rows = {(r["case"], r["provider"]): r for r in record["results"]}
    join = rows[("op:join:fwd_bwd:fp32:nchw:2x8x5x5", "resfused[cpu]")]
    assert join["status"] == "ok" and join["max_rel_err"] <= 1e-4 and join["speedup"] > 0
    assert join["GBps"] > 0 and 0 < join["fraction_of_copy"]
    dense = rows[("model:densenet121:saved:fp32:nchw:4x3x64x64", "resfused[cpu]")]
    memeff = rows[("model:densenet121:saved:fp32:nchw:4x3x64x64", "tv_memeff")]
    assert dense["saved_MiB"] < memeff["saved_MiB"] and 0 < dense["mem_ratio"] < memeff["mem_ratio"] < 1
    with open(out / "tiny.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(record["results"])
    for key in ("device", "torch", "triton", "cuda", "commit", "date", "dtype", "memory_format", "batch", "provider"):
        assert key in table[0]
    assert (out / "tiny.md").read_text().count("| case |") == 3


def test_tiny_run_plots(tiny_run):
    _, out, _ = tiny_run
    pytest.importorskip("matplotlib")
    for level in ("op", "block", "model"):
        png = out / f"tiny-{level}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_plots_skipped_with_a_reason_without_matplotlib(tiny_run, monkeypatch, tmp_path):
    _, _, record = tiny_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    paths, why = report.plot(record, str(tmp_path / "x"))
    assert paths == [] and "matplotlib is not available" in why
    assert os.listdir(tmp_path) == []


def test_table_and_markdown(tiny_run):
    _, _, record = tiny_run
    text = report.report_text(record)
    assert "speed-up" in text and "resfused[cpu]" in text and record["context"]["device"] in text
    md = report.report_text(record, markdown=True)
    assert "| case | provider |" in md


def test_compare(tiny_run):
    _, _, record = tiny_run
    old = copy.deepcopy(record)
    for row in old["results"]:
        if row.get("ms"):
            row["ms"] *= 2
    text = report.compare(old, record)
    assert "-50.0%" in text and "old" in text and "new" in text
    assert "(no result in common)" in report.compare({"results": []}, record)


def test_compare_option(tiny_run, capsys, tmp_path):
    _, out, _ = tiny_run
    assert cli.main(TINY + ["--level", "op", "--case", "apply", "--out", str(tmp_path), "--no-plot",
                            "--compare", str(out / "tiny.json")]) == 0
    text = capsys.readouterr().out
    assert "Compared with" in text and "apply fwd, fp32, NCHW" in text


# ---------------------------------------------------------------------------------------------
# a wrong result fails the run, loudly

def test_wrong_result_fails_the_run(monkeypatch, capsys, tmp_path):
    real = RF.batch_norm_act

    def wrong(*args, **kwargs):
        return real(*args, **kwargs) * 1.01
    monkeypatch.setattr(RF, "batch_norm_act", wrong)
    rc = cli.main(TINY + ["--level", "op", "--case", "join", "--out", str(tmp_path), "--no-plot"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "CORRECTNESS CHECK FAILED" in captured.err and "MISMATCH" in captured.err
    with open(tmp_path / "latest-cpu-tiny.json") as f:
        record = json.load(f)
    assert record["passed"] is False and record["failures"]
    bad = [r for r in record["results"] if r["provider"] == "resfused[cpu]"]
    assert bad and all(r["status"] == "mismatch" and r["max_rel_err"] > 1e-3 for r in bad)


def test_a_raising_resfused_provider_fails_the_run(monkeypatch, capsys, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(RF, "batch_norm_act", broken)
    rc = cli.main(TINY + ["--level", "op", "--case", "bn_relu", "--out", str(tmp_path), "--no-plot"])
    assert rc == 1
    assert "kernel exploded" in capsys.readouterr().err


def test_out_of_memory_skips_the_provider(monkeypatch, capsys, tmp_path):
    def oom(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
    monkeypatch.setattr(RF, "batch_norm_act", oom)
    rc = cli.main(TINY + ["--level", "op", "--case", "bn_relu", "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    with open(tmp_path / "latest-cpu-tiny.json") as f:
        record = json.load(f)
    rows = [r for r in record["results"] if r["provider"] == "resfused[cpu]"]
    assert rows and all(r["status"] == "skipped" and "out of memory" in r["reason"] for r in rows)


# ---------------------------------------------------------------------------------------------
# progress without tqdm

class _Tty:
    def __init__(self):
        self.lines = []

    def isatty(self):
        return True

    def write(self, s):
        self.lines.append(s)

    def flush(self):
        pass


def test_text_progress_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    stream = _Tty()
    progress = cli.Progress(2, stream=stream)
    assert progress.bar is None
    progress.begin("op join fwd")
    progress.log("  eager 1 ms")
    progress.step()
    progress.close()
    text = "".join(stream.lines)
    assert "[1/2" in text and "op join fwd" in text and "eager 1 ms" in text


@pytest.mark.parametrize("fixed,per,budget_images", [(1000, 100, 77), (10**6, 3000, 1000), (50, 7, 8), (0, 1, 5)])
def test_largest_batch_search(fixed, per, budget_images):
    """The max-batch search finds the largest multiple of 8 that fits, and with the peak
    readings it needs few probes (a linear model's prediction is tried first)."""
    from resfused.bench import runner

    budget = fixed + per * budget_images
    state = {"peak": 0}
    probes = []

    def probe(batch):
        probes.append(batch)
        need = fixed + per * batch
        if need > budget:
            raise RuntimeError("CUDA out of memory. Tried to allocate ...")
        state["peak"] = need

    class Inst:
        def clear(self):
            pass

    expected = max(0, budget_images // 8 * 8)
    cpu = torch.device("cpu")
    plain = runner._largest_batch(probe, 8, Inst(), cpu)
    n_plain = len(probes)
    probes.clear()
    modelled = runner._largest_batch(probe, 8, Inst(), cpu, budget=budget,
                                     peak=(lambda: state.update(peak=0), lambda: state["peak"]))
    assert plain == modelled == expected
    assert len(probes) <= max(4, n_plain), (probes, n_plain)
    if expected >= 64:
        assert len(probes) < n_plain


# ---------------------------------------------------------------------------------------------
# the Triton-convolution providers and the conv kernel report

def test_tconv_provider_applies_to_channels_last_resnet_cases():
    from resfused.bench.cases import not_applicable

    cases = {c.key: c for c in select_cases("quick", "cuda")}
    r50 = cases["model:resnet50:train_step:bf16:channels_last:128x3x224x224"]
    assert not_applicable(r50, "resfused[tconv]") is None and not_applicable(r50, "resfused[auto]") is None
    dense = cases["model:densenet121:train_step:bf16:channels_last:64x3x224x224"]
    assert not_applicable(dense, "resfused[tconv]") is None
    op = next(c for c in cases.values() if c.level == "op")
    assert not_applicable(op, "resfused[tconv]") and not_applicable(op, "resfused[auto]")
    nchw = next(c for c in select_cases("tiny", "cpu") if c.level == "block" and c.memory_format == "nchw")
    assert "channels_last" in not_applicable(nchw, "resfused[tconv]")
    tiny_cl = next(c for c in select_cases("tiny", "cpu") if c.level == "block" and c.memory_format == "channels_last")
    run, skipped = runner.case_providers(tiny_cl, PROVIDERS, torch.device("cpu"), "tiny", [])
    assert "resfused[tconv]" in skipped and "resfused[auto]" in skipped  # interpreter / same as resfused[cpu]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU run of the tconv provider needs the "
                    "Triton interpreter")
def test_tconv_provider_runs_and_is_checked(tmp_path):
    rc = cli.main(TINY + ["--level", "block", "--case", "bottleneck", "--provider", "eager_cl,resfused[tconv]",
                          "--out", str(tmp_path), "--name", "t", "--no-plot"])
    assert rc == 0
    with open(tmp_path / "t.json") as f:
        rows = [r for r in json.load(f)["results"] if r["provider"] == "resfused[tconv]"]
    assert rows and all(r["status"] == "ok" and r["max_rel_err"] <= 1e-4 for r in rows)


def test_compiled_resfused_provider_runs_and_is_checked(tmp_path):
    """resfused[compile]: torch.compile of the resfused call, timed and checked against eager
    like every provider; left out of --quick and, unless named, on the CPU (compiling)."""
    from resfused.bench.cases import not_applicable

    quick_op = next(c for c in select_cases("quick", "cuda") if c.level == "op")
    run, skipped = runner.case_providers(quick_op, PROVIDERS, torch.device("cuda"), "quick", [])
    assert "resfused[compile]" in skipped and "--provider resfused[compile]" in skipped["resfused[compile]"]
    saved = next(c for c in select_cases("tiny", "cpu") if c.mode == "saved")
    assert not_applicable(saved, "resfused[compile]")
    rc = cli.main(TINY + ["--level", "op", "--case", "join", "--mode", "fwd_bwd", "--provider",
                          "eager,resfused[compile]", "--out", str(tmp_path), "--name", "c", "--no-plot"])
    assert rc == 0
    with open(tmp_path / "c.json") as f:
        rows = [r for r in json.load(f)["results"] if r["provider"] == "resfused[compile]"]
    assert rows and all(r["status"] == "ok" and r["max_rel_err"] <= 1e-4 and r["ms"] > 0 for r in rows)


def test_conv_kernel_report(tmp_path, capsys):
    from resfused.bench import conv as bconv

    if torch.cuda.is_available():
        argv = ["--shape", "stage4.conv2", "--batch", "8", "--reps", "3"]
    elif os.environ.get("TRITON_INTERPRET") == "1":
        argv = ["--tiny", "--device", "cpu", "--dtype", "fp32", "--shape", "tiny.conv2s2"]
    else:
        pytest.skip("Triton cannot run here")
    assert bconv.main(argv + ["--out", str(tmp_path), "--name", "k"]) == 0
    with open(tmp_path / "k.json") as f:
        rec = json.load(f)
    assert rec["ceilings"]["matmul_TFLOPs"] > 0 and rec["ceilings"]["copy_GBps"] > 0
    assert {r["kernel"] for r in rec["rows"]} == {"fwd", "dgrad", "wgrad"}
    for r in rec["rows"]:
        assert r["triton_ms"] > 0 and r["library_ms"] > 0 and r["TFLOPs"] > 0 and r["GBps"] > 0
        assert r["max_rel_err"] <= bconv.tolerance(torch.float32 if "tiny" in r["shape"] else torch.bfloat16)
        if torch.cuda.is_available():  # the GPU's own times, and the rates taken from them
            assert r["triton_gpu_ms"] > 0 and r["library_gpu_ms"] > 0 and r["rates_from"] == "gpu", r
            assert r["gpu_speedup"] == pytest.approx(r["library_gpu_ms"] / r["triton_gpu_ms"])
        else:
            assert r["triton_gpu_ms"] is None and r["rates_from"] == "call" and "no CUDA device" in r["no_gpu_time"]
    assert "| shape | kernel |" in (tmp_path / "k.md").read_text()


@pytest.mark.parametrize("device", DEVICES)
def test_device_ms_times_the_gpu_alone(device):
    """device_ms replays a call from a CUDA graph: the GPU's own time; a call that cannot be
    captured (it copies to the host) and a CPU device give None with the reason."""
    from resfused.bench.runner import device_ms

    dev = torch.device(device)
    x = torch.randn(256, 256, device=dev)
    ms, why = device_ms(lambda: x @ x, dev, 5)
    if dev.type == "cuda":
        assert ms is not None and ms > 0 and why == ""
        ms, why = device_ms(lambda: (x @ x).sum().item(), dev, 5)
        assert ms is None and "CUDA graph" in why
        ms, why = device_ms(lambda: x @ x, dev, 5)  # capture state left clean after a failed capture
        assert ms is not None and ms > 0
    else:
        assert ms is None and why == "no CUDA device"


@pytest.mark.parametrize("argv, msg", [
    (["--shape", "stage9.conv1"], "stage1.conv1"),
    (["--batch", "0"], "positive"),
    (["--device", "tpu"], "cuda"),
    (["--dtype", "fp64"], "bf16"),
])
def test_conv_kernel_report_bad_input(argv, msg, capsys):
    from resfused.bench import conv as bconv

    with pytest.raises(SystemExit) as exc:
        bconv.main(argv)
    assert exc.value.code == 2 and msg in capsys.readouterr().err


def test_conv_kernel_report_refuses_cpu_timing(capsys):
    from resfused.bench import conv as bconv

    with pytest.raises(SystemExit) as exc:
        bconv.main(["--device", "cpu"])
    assert exc.value.code == 2 and "CUDA" in capsys.readouterr().err
