"""Reporting: the stdout table (plain or markdown), JSON and CSV records, PNG plots and
the comparison with an earlier run. Files are written atomically (temporary file, then
rename), so a file with the final name is always a whole one."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from .cases import PROVIDERS

RECORD_FORMAT = 1
CONTEXT_COLUMNS = ("device", "device_type", "torch", "torchvision", "triton", "cuda", "commit", "date")


# ---------------------------------------------------------------------------------------------
# formatting helpers

def _fmt_ms(v):
    if v is None:
        return ""
    return f"{v:.3f}" if v < 1 else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def _fmt_ratio(v):
    return "" if v is None else f"{v:.2f}x"


def _fmt_mib(v):
    return "" if v is None else (f"{v:.1f}" if v < 1000 else f"{v:.0f}")


def _fmt_err(v):
    if v is None:
        return ""
    return "inf" if not math.isfinite(v) else f"{v:.1e}"


def _throughput(row) -> str:
    if row.get("GBps") is not None:
        s = f"{row['GBps']:.1f} GB/s"
        if row.get("fraction_of_copy") is not None:
            s += f" ({100 * row['fraction_of_copy']:.0f}% of copy)"
        return s
    if row.get("images_per_s") is not None:
        return f"{row['images_per_s']:.1f} img/s"
    return ""


def _check(row) -> str:
    status = row.get("status")
    if status == "ok":
        if row.get("baseline"):
            return "baseline"
        return "ok" if row.get("max_rel_err") is not None else ""
    return {"mismatch": "MISMATCH", "error": "ERROR"}.get(status, status or "")


def case_title(row) -> str:
    mode = {"fwd_bwd": "fwd+bwd", "train_step": "train step", "max_batch": "max batch",
            "saved": "saved for backward"}.get(row["mode"], row["mode"])
    dtype = ("autocast " if row.get("autocast") else "") + row["dtype"]
    fmt = "CL" if row["case_memory_format"] == "channels_last" else "NCHW"
    shape = "x".join(str(s) for s in row["shape"])
    return f"{row['workload']} {mode}, {dtype}, {fmt}, {shape}"


_COLUMNS = [
    ("case", None),
    ("provider", lambda r: r["provider"]),
    ("layout", lambda r: "CL" if r.get("memory_format") == "channels_last" else "NCHW"),
    ("median ms", lambda r: _fmt_ms(r.get("ms"))),
    ("IQR", lambda r: "" if r.get("iqr_pct") is None else f"{r['iqr_pct']:.0f}%"),
    ("throughput", _throughput),
    ("speed-up", lambda r: _fmt_ratio(r.get("speedup"))),
    ("saved MiB", lambda r: _fmt_mib(r.get("saved_MiB"))),
    ("peak MiB", lambda r: _fmt_mib(r.get("peak_MiB"))),
    ("max batch", lambda r: "" if r.get("max_batch") is None else
     f"{r['max_batch']} (in {r.get('mem_budget_GiB')} GiB)"),
    ("mem ratio", lambda r: _fmt_ratio(r.get("mem_ratio"))),
    ("max rel err", lambda r: _fmt_err(r.get("max_rel_err"))),
    ("checked err / tol", lambda r: "" if r.get("check_err") is None or r.get("baseline") else
     f"{_fmt_err(r['check_err'])} / {r['tol']:.0e}"),
    ("check", _check),
]


def table_rows(rows: Sequence[dict]) -> Tuple[List[str], List[List[str]]]:
    """Header and cells of the results table (skipped providers left out; columns empty for
    every row dropped)."""
    shown = [r for r in rows if r.get("status") != "skipped"]
    cells = []
    last_case = None
    for r in shown:
        title = case_title(r)
        line = [title if r["case"] != last_case else ""]
        last_case = r["case"]
        line += [fn(r) for _, fn in _COLUMNS[1:]]
        cells.append(line)
    header = [name for name, _ in _COLUMNS]
    keep = [i for i, name in enumerate(header) if i < 3 or any(c[i] for c in cells)]
    return [header[i] for i in keep], [[c[i] for i in keep] for c in cells]


def format_table(rows: Sequence[dict], markdown: bool = False) -> str:
    header, cells = table_rows(rows)
    if not cells:
        return "(no results)"
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in cells]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    sep = "  "
    out = [sep.join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
           sep.join("-" * w for w in widths)]
    for line in cells:
        if line[0] and len(out) > 2:
            out.append("")
        out.append(sep.join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    return "\n".join(out)


def skipped_lines(rows: Sequence[dict]) -> List[str]:
    """One line per (provider, reason) skipped in some case, with how many cases."""
    seen: Dict[Tuple[str, str], int] = {}
    for r in rows:
        if r.get("status") == "skipped":
            key = (r["provider"], r.get("reason") or "")
            seen[key] = seen.get(key, 0) + 1
    return [f"{p} skipped in {n} case{'s' if n > 1 else ''}: {why}" for (p, why), n in seen.items()]


def report_text(record: dict, markdown: bool = False) -> str:
    """Every level's table, with a heading naming the device and what was timed."""
    ctx = record["context"]
    parts = []
    head = (f"resfused benchmark, preset {record['config']['preset']}: {ctx['device']}, torch {ctx['torch']}, "
            f"triton {ctx['triton']}, CUDA {ctx['cuda']}, commit {ctx['commit']}"
            f"{' (modified)' if ctx.get('commit_dirty') else ''}, {ctx['date']}")
    parts.append(("**" + head + "**") if markdown else "# " + head)
    if not record.get("complete", True):  # (the file name says so too: <name>-incomplete.*)
        mark = (f"INCOMPLETE RUN ({record.get('incomplete_reason')}): "
                f"{len(record.get('cases_not_run', []))} case(s) not run")
        parts.append(("\n**" + mark + "**") if markdown else "# " + mark)
    for level in ("op", "block", "model"):
        rows = [r for r in record["results"] if r["level"] == level]
        if not rows:
            continue
        parts.append(("\n" if markdown else "\n## ") + LEVEL_TITLES[level] + ("\n" if markdown else ""))
        parts.append(format_table(rows, markdown))
    parts.append("")
    parts += [("* " if markdown else "- ") + line for line in LEGEND]
    notes = skipped_lines(record["results"])
    parts += [("* " if markdown else "- ") + n for n in notes]
    return "\n".join(parts)


LEGEND = (
    "median ms: median over the timed repeats (after warm-up; providers take turns); IQR: their interquartile "
    "range as a % of the median; speed-up: the eager baseline's median / the provider's",
    "mem ratio: the provider's peak memory (CUDA) or bytes saved for backward (elsewhere) / the baseline's "
    "(max batch cases: the baseline's largest batch / the provider's)",
    "max rel err: the largest max |a - b| / max |b| of the compared outputs and gradients, against the eager "
    "baseline (fp32) or against eager in fp32 (bf16/fp16: the baseline's row shows eager's own error)",
    "checked err / tol: outputs are held to their max relative error, gradients to their relative L2 error (a "
    "ReLU input within rounding of 0 flips one gradient element between correct implementations, so one "
    "gradient element can be far off in a correct result); shown for the tensor nearest its tolerance; fp32: "
    "fixed tolerances (checked calls run with TF32 off), bf16/fp16: 2x eager's own error; a resfused MISMATCH "
    "fails the run",
)


LEVEL_TITLES = {
    "op": "op level: one call of the op (fwd: training forward; fwd+bwd: forward and backward of x, r, "
          "weight, bias); GB/s counts each tensor read or written once",
    "block": "block level: training forward + backward of one block (input and parameter gradients)",
    "model": "model level: train step = forward + cross-entropy + backward + SGD step; inference = eval "
             "forward under inference_mode; saved = bytes autograd keeps for backward (parameters excluded)",
}


# ---------------------------------------------------------------------------------------------
# files

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # (mkstemp makes 0600) the mode a plain open() would give
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def to_json(record: dict) -> str:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(record), indent=1) + "\n"


def to_csv(record: dict) -> str:
    ctx = record["context"]
    rows = record["results"]
    keys: List[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    header = list(CONTEXT_COLUMNS) + ["preset"] + keys
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        line = [ctx.get(k) for k in CONTEXT_COLUMNS] + [record["config"]["preset"]]
        for k in keys:
            v = r.get(k)
            if k == "shape" and v is not None:
                v = "x".join(str(s) for s in v)
            elif isinstance(v, float):
                v = f"{v:.6g}"
            line.append("" if v is None else v)
        w.writerow(line)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# plots

def plot(record: dict, stem: str) -> Tuple[List[str], Optional[str]]:
    """One PNG per level (speed-up and memory ratio against eager, bars per provider per
    case). Returns (paths written, why no plot was drawn or None)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # ImportError, or a broken install
        return [], f"plots skipped: matplotlib is not available ({type(exc).__name__}: {exc}); pip install matplotlib"
    ctx = record["context"]
    written = []
    for level in ("op", "block", "model"):
        rows = [r for r in record["results"] if r["level"] == level and r.get("status") != "skipped"]
        if not rows:
            continue
        cases: List[str] = []
        for r in rows:
            if r["case"] not in cases:
                cases.append(r["case"])
        order = {p: i for i, p in enumerate(PROVIDERS)}
        providers = sorted({r["provider"] for r in rows if not r.get("baseline")}, key=lambda p: order.get(p, 99))
        titles = {r["case"]: case_title(r) for r in rows}
        by = {(r["case"], r["provider"]): r for r in rows}
        fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.1 * len(cases) + 4), 9), squeeze=True)
        for ax, key, what, title in (
                (axes[0], "speedup", "speed-up vs eager", "time: eager / provider (higher is better)"),
                (axes[1], "mem_ratio", "memory vs eager", "memory: provider / eager (lower is better); peak "
                                                          "memory on CUDA, bytes saved for backward elsewhere")):
            width = 0.8 / max(len(providers), 1)
            drawn = False
            for i, p in enumerate(providers):
                xs, ys = [], []
                for j, c in enumerate(cases):
                    v = by.get((c, p), {}).get(key)
                    if v is not None and math.isfinite(v):
                        xs.append(j + (i - (len(providers) - 1) / 2) * width)
                        ys.append(v)
                if xs:
                    bars = ax.bar(xs, ys, width, label=p)
                    ax.bar_label(bars, fmt="%.2f", fontsize=7)
                    drawn = True
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylabel(what, fontsize=8)
            ax.set_title(title, fontsize=8)
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels([titles[c] for c in cases], rotation=25, ha="right", fontsize=7)
            if drawn:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not measured at this level", transform=ax.transAxes, ha="center")
        fig.suptitle(f"resfused {level} level, preset {record['config']['preset']}: {ctx['device']}\n"
                     f"torch {ctx['torch']}, commit {ctx['commit']}, {ctx['date']}", fontsize=9)
        fig.tight_layout()
        path = f"{stem}-{level}.png"
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=directory)
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=110)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        finally:
            plt.close(fig)
            if os.path.exists(tmp):
                os.unlink(tmp)
        written.append(path)
    return written, None


# ---------------------------------------------------------------------------------------------
# comparison with an earlier run

def load_record(path: str) -> dict:
    """An earlier run's JSON record; ValueError with the reason if it is not one."""
    try:
        with open(path) as f:
            record = json.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(record, dict) or not isinstance(record.get("results"), list):
        raise ValueError(f"{path} is not a resfused benchmark record (no 'results' list)")
    if not isinstance(record.get("context", {}), dict):
        raise ValueError(f"{path} is not a resfused benchmark record ('context' is not an object)")
    for i, row in enumerate(record["results"]):
        if not isinstance(row, dict) or not isinstance(row.get("case"), str) or not isinstance(row.get("provider"),
                                                                                               str):
            raise ValueError(f"{path} is not a resfused benchmark record (result {i} has no 'case' and 'provider')")
        for key in ("ms", "saved_MiB", "max_batch", "speedup"):
            v = row.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"{path} is not a resfused benchmark record (result {i}: {key} is {v!r}, not a "
                                 f"number)")
    return record


def _metric(row) -> Tuple[Optional[str], Optional[float]]:
    for key, name in (("ms", "ms"), ("saved_MiB", "saved MiB"), ("max_batch", "max batch")):
        v = row.get(key)
        if isinstance(v, (int, float)):
            return name, float(v)
    return None, None


def compare(old: dict, new: dict, markdown: bool = False) -> str:
    """case / provider / old / new / change for every result present in both runs."""
    old_rows = {(r.get("case"), r.get("provider")): r for r in old["results"]}
    lines = []
    notes = []
    if old.get("complete") is False:
        notes.append("the old record is marked incomplete")
    o_ctx, n_ctx = old.get("context", {}), new.get("context", {})
    for key in ("device", "torch", "commit"):
        if o_ctx.get(key) != n_ctx.get(key):
            notes.append(f"{key}: {o_ctx.get(key)} -> {n_ctx.get(key)}")
    for r in new["results"]:
        o = old_rows.get((r["case"], r["provider"]))
        if o is None:
            continue
        name, nv = _metric(r)
        oname, ov = _metric(o)
        if name is None or name != oname or not ov:
            continue
        change = 100 * (nv - ov) / ov
        speedups = ""
        if o.get("speedup") is not None and r.get("speedup") is not None and not r.get("baseline"):
            speedups = f"{o['speedup']:.2f}x -> {r['speedup']:.2f}x"
        lines.append([case_title(r), r["provider"], name, f"{ov:.4g}", f"{nv:.4g}", f"{change:+.1f}%", speedups])
    header = ["case", "provider", "metric", "old", "new", "change", "speed-up vs eager (old -> new)"]
    out = [f"Compared with {old.get('context', {}).get('date', '?')} ({len(lines)} results in both runs; "
           f"for ms and MiB negative is better, for max batch positive; speed-ups are measured side by side "
           f"within each run, so they drift less than absolute times)"]
    out += [f"  note: {n}" for n in notes]
    if not lines:
        out.append("(no result in common)")
        return "\n".join(out)
    if markdown:
        out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)


def write_record(record: dict, stem: str) -> List[str]:
    """JSON, CSV and markdown of the record next to each other; returns the paths."""
    paths = []
    for ext, text in (("json", to_json(record)), ("csv", to_csv(record)), ("md", report_text(record, True) + "\n")):
        path = f"{stem}.{ext}"
        atomic_write(path, text)
        paths.append(path)
    return paths


__all__ = ["atomic_write", "compare", "format_table", "load_record", "plot", "report_text", "skipped_lines",
           "to_csv", "to_json", "write_record"]
