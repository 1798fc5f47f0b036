"""Data-parallel one-shot pruning: 2 CPU processes (torchrun, gloo) each run half of the calibration batches, the
statistics are summed over the processes (`hf_prune.core.distributed`), and the pruned model must equal the
single-process one up to float summation order. One torchrun launch runs every case (a launch costs ~10 s of
start-up on 2 cores); the reference runs in the test process. Also: the bad inputs (calibration that differs
between processes or cannot be split, a sharded model, a failure on one rank) and the single-process units."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import build, build_moe, calib_ids, run_two_processes

from hf_prune import CalibrationError, PruningConfig, UnsupportedModelError
from hf_prune.core.distributed import (
    World,
    all_reduce_stats,
    check_not_sharded,
    failing_together,
    is_main_process,
    shard_batches,
    world,
)
from hf_prune.core.stats import InputStats
from hf_prune.oneshot.pipeline import assign_groups

TESTS = Path(__file__).resolve().parent

#: name -> PruningConfig fields; every case runs on build("llama") with calib_ids(8, 32) in batches of 2
CASES: dict[str, dict] = {
    "wanda": dict(method="wanda", sparsity=0.5),
    "wanda_owl": dict(method="wanda", sparsity=0.5, owl=True),
    "ria_24": dict(method="ria", structure="2:4"),
    "sparsegpt": dict(method="sparsegpt", sparsity=0.5),
    "sparsegpt_24": dict(method="sparsegpt", structure="2:4"),
    "admm": dict(method="admm", sparsity=0.5),
    "magnitude": dict(method="magnitude", sparsity=0.5),
    "flap_refit": dict(method="flap", sparsity=0.2, reconstruct=True),
    "taylor": dict(method="taylor", sparsity=0.2),
    "angular": dict(method="angular", sparsity=0.3),
    # routed experts (structured, block by block): statistics summed over the ranks, incl. the maxima of the guard
    "reap_moe": dict(method="reap", sparsity=0.25, arch="qwen3_moe"),
    "easy_ep_global_merge": dict(method="easy-ep", sparsity=0.5, expert_allocation="global", expert_merge=True,
                                 arch="mixtral"),
    # dual importance: rank 0 runs the general batches, rank 1 the domain ones; each side summed over the ranks
    "wanda_dual": dict(method="wanda", sparsity=0.5, domain_weight=2.0, sources=True),
    "flap_dual": dict(method="flap", sparsity=0.2, domain_weight=0.5, sources=True),
}
STRUCTURED = ("flap", "taylor", "angular", "reap", "easy-ep")
SAMPLES, SEQLEN, BATCH = 8, 32, 2


def run_case(name: str) -> dict[str, torch.Tensor]:
    """Prune a fresh tiny Llama with case ``name``; its state dict."""
    case = dict(CASES[name])
    arch = case.pop("arch", None)
    calibration: Any = calib_ids(SAMPLES, SEQLEN)
    if case.pop("sources", False):
        calibration = {"general": calibration, "domain": calib_ids(SAMPLES, SEQLEN, seed=1) % 40}
    model = build("llama") if arch is None else build_moe(arch)
    cfg = PruningConfig(**case, num_calibration_samples=SAMPLES, seqlen=SEQLEN, batch_size=BATCH)
    model.prune(cfg, calibration=calibration, verbose=False, show_progress=False)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _stats_inputs() -> torch.Tensor:
    return torch.randn(6, 5, 16, generator=torch.Generator().manual_seed(3))


SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[2])
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    dist.init_process_group("gloo")
    import hf_prune
    from hf_prune import PruningConfig
    from hf_prune.core.distributed import all_reduce_stats, failing_together, is_main_process, world
    from hf_prune.core.stats import InputStats
    from test_distributed import BATCH, CASES, SAMPLES, SEQLEN, _stats_inputs, run_case
    from tiny_models import build, calib_ids

    out = sys.argv[1]
    rank = world().rank
    info = {"rank": rank, "size": world().size, "errors": {}}

    def expect_error(name, fn):
        try:
            fn()
            info["errors"][name] = None
        except Exception as exc:
            info["errors"][name] = [type(exc).__name__, str(exc)]

    # statistics of this rank's half of the inputs, summed over both ranks
    x = _stats_inputs()[rank * 3:(rank + 1) * 3]
    stats = InputStats(16, torch.device("cpu"), norms=True, hessian=True)
    stats.add(x)
    all_reduce_stats({"layer": stats})
    save_file({"sum_sq": stats.sum_sq, "hessian": stats.full_hessian(), "n": torch.tensor([stats.n_tokens])},
              f"{out}/stats-rank{rank}.safetensors")

    import hf_prune.oneshot.pipeline as pipeline
    record = pipeline.record_block_inputs
    seen = []
    pipeline.record_block_inputs = lambda model, blocks, calib, bs: seen.append(calib.shape[0]) or record(
        model, blocks, calib, bs)
    for name in CASES:
        save_file(run_case(name), f"{out}/{name}-rank{rank}.safetensors")
    pipeline.record_block_inputs = record
    info["samples_seen"] = seen

    # save_pretrained called on every rank: rank 0 writes, the others skip (no race on the temporary folder)
    model = build("llama")
    cfg = PruningConfig(method="wanda", num_calibration_samples=SAMPLES, seqlen=SEQLEN, batch_size=BATCH)
    model.prune(cfg, calibration=calib_ids(SAMPLES, SEQLEN), verbose=False, show_progress=False)
    model.save_pretrained(f"{out}/checkpoint")
    dist.barrier()
    info["checkpoint_files"] = sorted(os.listdir(f"{out}/checkpoint"))

    # bad inputs: every rank must raise, none may hang
    expect_error("different_calibration", lambda: build("llama").prune(
        cfg, calibration=calib_ids(SAMPLES, SEQLEN, seed=rank), verbose=False, show_progress=False))
    expect_error("too_few_samples", lambda: build("llama").prune(
        cfg, calibration=calib_ids(1, SEQLEN), verbose=False, show_progress=False))
    def different_model():
        from transformers import LlamaForCausalLM
        config = build("llama").config
        torch.manual_seed(rank)
        m = LlamaForCausalLM(config)
        m.prune(cfg, calibration=calib_ids(SAMPLES, SEQLEN), verbose=False, show_progress=False)
    expect_error("different_model", different_model)
    def one_rank_fails():
        with failing_together("the test block"):
            if rank == 1:
                raise ValueError("boom on rank 1")
    expect_error("one_rank_fails", one_rank_fails)
    def sharded():
        from torch.distributed.fsdp import fully_shard
        m = build("llama")
        for layer in m.model.layers:
            fully_shard(layer)
        fully_shard(m)
        m.prune(cfg, calibration=calib_ids(SAMPLES, SEQLEN), verbose=False, show_progress=False)
    expect_error("sharded_model", sharded)
    json.dump(info, open(f"{out}/rank{rank}.json", "w"))
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """One torchrun launch with 2 gloo processes running every case; the folder with their outputs."""
    out = tmp_path_factory.mktemp("dist")
    run_two_processes(SCRIPT, out, str(TESTS))
    return out


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _info(out: Path, rank: int) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


@pytest.mark.timeout(200)
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one(two_processes: Path, name: str) -> None:
    """Both ranks hold the same pruned model, equal to the single-process run: every zero in the same place
    (masks equal) and the values (SparseGPT/ADMM updates, FLAP refits) equal up to float summation order."""
    r0, r1 = (_load(two_processes / f"{name}-rank{r}.safetensors") for r in (0, 1))
    ref = run_case(name)
    assert r0.keys() == r1.keys() == ref.keys()
    for key in ref:
        assert torch.equal(r0[key], r1[key]), f"{name}: {key} differs between the ranks"
        assert r0[key].shape == ref[key].shape, f"{name}: {key} has another shape than the single-process run"
        if ref[key].dtype.is_floating_point:
            assert torch.equal(r0[key] == 0, ref[key] == 0), f"{name}: the mask of {key} differs"
            assert torch.allclose(r0[key], ref[key], rtol=1e-4, atol=1e-5), f"{name}: {key} differs"


@pytest.mark.timeout(200)
def test_each_process_runs_half_the_samples(two_processes: Path) -> None:
    one_shot = [c for c in CASES.values() if c["method"] not in (*STRUCTURED, "magnitude")]
    # plus, on rank 0 only, the OWL search's own first samples (owl_search_samples=8, all of SAMPLES here): the
    # search runs on the main process and broadcasts its choice
    owl_search = [min(8, SAMPLES)]
    assert _info(two_processes, 1)["samples_seen"] == [SAMPLES // 2] * len(one_shot)
    seen = _info(two_processes, 0)["samples_seen"]
    assert sorted(seen) == sorted([SAMPLES // 2] * len(one_shot) + owl_search)


@pytest.mark.timeout(200)
def test_statistics_are_summed_over_processes(two_processes: Path) -> None:
    x = _stats_inputs()
    full = InputStats(16, torch.device("cpu"), norms=True, hessian=True)
    full.add(x)
    for rank in (0, 1):
        got = _load(two_processes / f"stats-rank{rank}.safetensors")
        assert int(got["n"]) == full.n_tokens == 30
        assert torch.allclose(got["sum_sq"], full.sum_sq, rtol=1e-6)
        assert torch.allclose(got["hessian"], full.full_hessian(), rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(200)
def test_only_rank_zero_writes_the_checkpoint(two_processes: Path) -> None:
    files = _info(two_processes, 1)["checkpoint_files"]
    assert "model.safetensors" in files and "pruning_report.json" in files and "config.json" in files
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(two_processes / "checkpoint")
    assert model.config.pruning_config["method"] == "wanda"
    ref = run_case("wanda")
    for key, value in model.state_dict().items():
        assert torch.allclose(value, ref[key], rtol=1e-4, atol=1e-5), key


@pytest.mark.timeout(200)
@pytest.mark.parametrize(("case", "error", "words"), [
    ("different_calibration", "DistributedError", "calibration token ids differ between processes"),
    ("too_few_samples", "CalibrationError", "fewer than the 2 processes"),
    ("different_model", "DistributedError", "the weights of block 0 differ between processes"),
    ("sharded_model", "UnsupportedModelError", "DTensor"),
])
def test_bad_input_raises_on_every_rank(two_processes: Path, case: str, error: str, words: str) -> None:
    for rank in (0, 1):
        got = _info(two_processes, rank)["errors"][case]
        assert got is not None and got[0] == error and words in got[1], (rank, got)


@pytest.mark.timeout(200)
def test_a_failure_on_one_rank_is_raised_on_all(two_processes: Path) -> None:
    r0, r1 = (_info(two_processes, r)["errors"]["one_rank_fails"] for r in (0, 1))
    assert r1 == ["ValueError", "boom on rank 1"]
    assert r0[0] == "DistributedError" and "rank 1 of 2 failed the test block: ValueError: boom on rank 1" in r0[1]


# ------------------------------------------------------------------------------------------ single process
def test_one_process_is_the_identity() -> None:
    assert world() == World() and is_main_process()
    s = InputStats(4, torch.device("cpu"), norms=True, hessian=False)
    s.add(torch.ones(3, 4))
    all_reduce_stats({"a": s})
    assert s.n_tokens == 3 and s.sum_sq.tolist() == [3.0] * 4
    ids = calib_ids(5, 8)
    assert shard_batches(ids, 2) is ids
    with pytest.raises(ValueError, match="plain"):
        with failing_together("x"):
            raise ValueError("plain")


def test_shard_batches_covers_every_sample_once() -> None:
    ids = calib_ids(11, 4)
    for size in (1, 2, 3, 5, 6):
        parts = [shard_batches(ids, 2, World(r, size)) for r in range(size)]
        assert torch.equal(torch.cat(parts), ids)
        assert all(p.shape[0] % 2 == 0 for p in parts[:-1])  # whole batches; only the last one may be short
    with pytest.raises(CalibrationError, match="6 batch"):
        shard_batches(ids, 2, World(0, 7))


def test_assign_groups_balances() -> None:
    owners = assign_groups([8.0, 1.0, 1.0, 1.0, 4.0, 3.0], 2)
    load = [sum(c for c, o in zip([8.0, 1.0, 1.0, 1.0, 4.0, 3.0], owners) if o == r) for r in (0, 1)]
    assert sorted(load) == [9.0, 9.0]
    assert assign_groups([1.0, 2.0], 1) == [0, 0]


def test_sharded_or_wrapped_models_are_refused() -> None:
    model = build("llama")

    class DistributedDataParallel(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    with pytest.raises(UnsupportedModelError, match="wrapped.module"):
        check_not_sharded(DistributedDataParallel(model))
    check_not_sharded(model)
