"""Synchronized batch statistics under DistributedDataParallel: 2 processes on the gloo
backend (CPU, float64) give the gradients, outputs and running statistics of one process
with the concatenated batch; ranks that disagree on shapes raise on every rank (no hang) and change
no running statistic; a wrong kind of process group is a clear error."""
from __future__ import annotations

import copy
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn
from torchvision.models.densenet import _DenseBlock, _Transition
from torchvision.models.resnet import BasicBlock

import resfused
from utils import assert_close, rel_tol

WORLD = 2
BATCH = 3  # per rank


def _reference_and_input(how):
    """torchvision's resnet18 (convert: the whole model under DDP); for torch's own
    convert_sync_batchnorm, two bare blocks, a dense block and a transition (nn.SyncBatchNorm
    outside our blocks needs a GPU)."""
    torch.manual_seed(0)
    if how == "convert":
        model = torchvision.models.resnet18(num_classes=5)
        x = torch.randn(WORLD * BATCH, 3, 32, 32)
    elif how == "convert_densenet":
        model = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2,
                                            num_classes=5)
        x = torch.randn(WORLD * BATCH, 3, 32, 32)
    else:
        ds = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        model = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=ds),
                              _DenseBlock(2, 16, 2, 4, 0.0), _Transition(24, 12))
        x = torch.randn(WORLD * BATCH, 8, 9, 9)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    # float64: the comparison tests the synchronization, not fp32 summation order (the
    # stem's BN weight gradients nearly cancel)
    return model.double(), x.double()


def _worker(rank, init_file, how, result_dir):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        torch.set_num_threads(1)
        tv, x = _reference_and_input(how)
        if how.startswith("convert") and how != "convert_sync_batchnorm":
            model = resfused.convert(copy.deepcopy(tv), sync_bn=True)
            run = nn.parallel.DistributedDataParallel(model)
        else:  # torch's own conversion applied to an already converted model; DDP refuses
            # nn.SyncBatchNorm on CPU, so gradients are averaged here as DDP would
            model = nn.SyncBatchNorm.convert_sync_batchnorm(resfused.convert(copy.deepcopy(tv)))
            run = model
        assert any(isinstance(m, (resfused.FusedBasicBlock, resfused.FusedDenseBlock)) for m in model.modules())
        if how == "convert_sync_batchnorm":  # (the dense block and the transition run fused on their SyncBatchNorms)
            assert isinstance(model[2], resfused.FusedDenseBlock) and model[2]._fusable() and model[3]._fusable()
        xs = x[rank * BATCH:(rank + 1) * BATCH]
        for step in range(2):
            out = run(xs)
            out.square().mean().backward()
            if how == "convert_sync_batchnorm":
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= WORLD
            torch.save({"out": out.detach(), "grads": [p.grad.clone() for p in model.parameters()],
                        "buffers": [b.clone() for b in model.buffers()]},
                       os.path.join(result_dir, f"{how}-{rank}-{step}.pt"))
            for p in model.parameters():
                p.grad = None
        dist.barrier()
    except Exception:
        with open(os.path.join(result_dir, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(fn, *args):
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        mp.spawn(fn, args=(init_file, *args), nprocs=WORLD, join=True)


@pytest.mark.parametrize("how", ["convert", "convert_densenet", "convert_sync_batchnorm"])
def test_ddp_sync_bn_equals_one_process_with_the_whole_batch(how, tmp_path):
    _spawn(_worker, how, str(tmp_path))
    tv, x = _reference_and_input(how)
    for step in range(2):
        out = tv(x)
        out.square().mean().backward()
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"{how}-{rank}-{step}.pt")
            mine = out[rank * BATCH:(rank + 1) * BATCH].detach()
            assert_close(got["out"], mine, *rel_tol(mine, 1e-9), f"step {step} rank {rank} output")
            for (name, p), g in zip(tv.named_parameters(), got["grads"]):
                assert_close(g, p.grad, *rel_tol(p.grad, 1e-7), f"step {step} rank {rank} grad {name}")
            for (name, b), g in zip(tv.named_buffers(), got["buffers"]):
                if b.dtype.is_floating_point:
                    assert_close(g, b, *rel_tol(b, 1e-9), f"step {step} rank {rank} buffer {name}")
                else:
                    assert torch.equal(g, b), f"step {step} rank {rank} buffer {name}"
        for p in tv.parameters():
            p.grad = None


def _mismatch_worker(rank, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        width = 4 if rank == 0 else 6  # the ranks disagree on the channel count
        block = resfused.convert(nn.Sequential(BasicBlock(width, width)), sync_bn=True)
        before = copy.deepcopy(block.state_dict())
        try:
            block(torch.randn(2, width, 5, 5))
            message = "no error"
        except RuntimeError as exc:
            message = str(exc)
        unchanged = all(torch.equal(v, before[k]) for k, v in block.state_dict().items())
        with open(os.path.join(result_dir, f"mismatch-{rank}.txt"), "w") as f:
            f.write(f"{unchanged}\n{message}")
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_channels_raise_on_every_rank(tmp_path):
    _spawn(_mismatch_worker, str(tmp_path))
    for rank in range(WORLD):
        unchanged, message = (tmp_path / f"mismatch-{rank}.txt").read_text().split("\n", 1)
        assert "ranks disagree on the channel count" in message, message
        assert unchanged == "True", f"rank {rank}: running statistics changed by a call that raised"


def test_wrong_process_group_and_uninitialized_are_clear_errors():
    model = torchvision.models.resnet18(num_classes=5)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        resfused.convert(copy.deepcopy(model), sync_bn=True, process_group="world")
    fused = resfused.convert(copy.deepcopy(model), sync_bn=True)
    before = copy.deepcopy(fused.state_dict())
    with pytest.raises(RuntimeError, match="not initialized"):
        fused(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(v, before[k]) for k, v in fused.state_dict().items())
    fused.eval()  # running statistics: nothing to synchronize
    fused(torch.randn(2, 3, 32, 32))
    assert resfused.revert(fused).state_dict().keys() == model.state_dict().keys()
    assert all(type(m) in (nn.BatchNorm2d,) for m in fused.modules() if isinstance(m, nn.BatchNorm2d))


def test_convert_synchronizes_a_batch_norm_act_keeping_its_activation_and_revert_restores_it():
    """A user's ``BatchNormAct2d`` (with its ReLU) under ``convert(sync_bn=True)`` is
    synchronized, not skipped, and keeps its activation; ``revert`` unsynchronizes it. (torch's
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` would replace it by a plain SyncBatchNorm,
    ReLU lost: the README says so.)"""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), resfused.BatchNormAct2d(4), resfused.BatchNormAct2d(4, sync_bn=True))
    model = resfused.convert(model, sync_bn=True)
    assert model[1].sync_bn and model[1].activation == "relu" and type(model[1]) is resfused.BatchNormAct2d
    assert model[2].sync_bn
    with pytest.raises(RuntimeError, match="not initialized"):  # (synchronized: needs a process group)
        model.train()(torch.randn(2, 3, 6, 6))
    resfused.revert(model)
    assert not model[1].sync_bn and model[1].process_group is None and model[1].activation == "relu"
    assert model[2].sync_bn  # (synchronized by its owner, not by convert)
    assert "_resfused_synced" not in model[1].__dict__


def test_fold_shares_a_models_process_group():
    """``fold`` copies the model; a process group (which cannot be copied or pickled) is
    shared with the copy, not copied."""
    import threading

    from torchvision.models.densenet import DenseNet

    torch.manual_seed(0)
    group = threading.Lock()  # (a stand-in that, like a ProcessGroup, deepcopy refuses; eval never uses it)
    for tv in (torchvision.models.resnet18(num_classes=5),
               DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=5)):
        model = resfused.convert(tv, sync_bn=True).eval()
        for m in model.modules():
            if getattr(m, "sync_bn", False):
                m.process_group = group
        folded = resfused.fold(model)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    # (a DenseNet's blocks are kept as they are, synchronized, on the shared group)
    assert any(getattr(m, "process_group", None) is group for m in folded.modules())


def _single_value_model():
    """A block, a dense block and a BatchNormAct2d, all synchronized (float64)."""
    torch.manual_seed(0)
    model = resfused.convert(nn.Sequential(BasicBlock(4, 4), _DenseBlock(1, 4, 2, 2, 0.0)), sync_bn=True)
    model.append(resfused.BatchNormAct2d(6, sync_bn=True))
    return model.double()


def _single_value_worker(rank, init_file, sizes, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _single_value_model()
        before = copy.deepcopy(model.state_dict())
        torch.manual_seed(1)
        x = torch.randn(sum(sizes), 4, 1, 1, dtype=torch.float64)[sum(sizes[:rank]):sum(sizes[:rank + 1])]
        try:
            out, message = model(x).detach(), ""
        except ValueError as exc:
            out, message = None, str(exc)
        unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        torch.save({"out": out, "message": message, "unchanged": unchanged, "state": model.state_dict()},
                   os.path.join(result_dir, f"single-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [(1, 1), (1, 0)])
def test_one_value_per_channel_per_rank(sizes, tmp_path):
    """As nn.SyncBatchNorm: one value per channel on a rank (batch 1 at a 1x1 stage) is
    fine when the process group holds more than one, and normalises over the whole batch;
    one value over the whole group raises on every rank (no rank left waiting) and
    changes nothing."""
    _spawn(_single_value_worker, sizes, str(tmp_path))
    got = [torch.load(tmp_path / f"single-{rank}.pt") for rank in range(WORLD)]
    if sum(sizes) == 1:
        for rank, g in enumerate(got):
            assert "Expected more than 1 value per channel" in g["message"], g["message"]
            assert g["unchanged"], f"rank {rank}: state changed by a call that raised"
        return
    ref = _single_value_model()
    for m in ref.modules():  # one process with the whole batch: nothing to synchronize
        m.__dict__.pop("sync_bn", None)
    torch.manual_seed(1)
    expected = ref(torch.randn(sum(sizes), 4, 1, 1, dtype=torch.float64)).detach()
    for rank, g in enumerate(got):
        mine = expected[sum(sizes[:rank]):sum(sizes[:rank + 1])]
        assert_close(g["out"], mine, *rel_tol(mine, 1e-9), f"rank {rank} output")
        for k, v in ref.state_dict().items():
            assert_close(g["state"][k].double(), v.double(), *rel_tol(v.double(), 1e-9), f"rank {rank} {k}")


def _no_running_stats_model():
    """A block, a dense block with its transition and a BatchNormAct2d, synchronized, every
    BN without running statistics (so in eval each normalises with batch statistics)."""
    from torchvision.models.densenet import _DenseBlock, _Transition

    torch.manual_seed(0)
    model = nn.Sequential(BasicBlock(4, 4), _DenseBlock(1, 4, 2, 2, 0.0), _Transition(6, 6))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    model = resfused.convert(model, sync_bn=True)
    model.append(resfused.BatchNormAct2d(6, track_running_stats=False, sync_bn=True))
    return model.double().eval()


def _eval_alone_worker(rank, init_file, result_dir):
    import datetime

    # (a collective rank 1 never joins fails after the timeout instead of hanging the test)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        if rank == 0:  # evaluates on its own, as a validation loop on rank 0 does
            model = _no_running_stats_model()
            torch.manual_seed(1)
            out = model(torch.randn(3, 4, 6, 6, dtype=torch.float64))
            torch.save(out.detach(), os.path.join(result_dir, "eval-alone.pt"))
    finally:
        dist.destroy_process_group()


def test_eval_without_running_stats_normalises_each_rank_alone(tmp_path):
    """As nn.SyncBatchNorm: statistics are synchronized in training only. In eval a BN
    without running statistics normalises with its own rank's batch and joins no
    collective, so one rank can evaluate alone."""
    _spawn(_eval_alone_worker, str(tmp_path))
    model = _no_running_stats_model()
    for m in model.modules():  # the same model, nothing synchronized
        m.__dict__.pop("sync_bn", None)
    torch.manual_seed(1)
    expected = model(torch.randn(3, 4, 6, 6, dtype=torch.float64)).detach()
    assert_close(torch.load(tmp_path / "eval-alone.pt"), expected, *rel_tol(expected, 1e-12), "rank 0 output")
