"""Training-time pruning under FSDP2: 2 CPU processes (torchrun, gloo) shard a tiny Llama with ``fully_shard``
(parameters are DTensors sharded on dim 0) and train it with `PruningCallback` driven by a minimal loop that
fires the Trainer's callback events in the Trainer's order. Checked against the same loop in one process:
GMP and movement masks equal, masked weights exactly zero on every shard, the exact cross-shard ranking
(`hf_prune.training.sharded.lowest_k`) equal to the unsharded one with ties, checkpoints written whole by rank
0, and a resumed run equal to an uninterrupted one. SGD without momentum keeps the optimizer stateless, so a
resume only needs the weights and hf_prune's state."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import VOCAB, build, run_two_processes

from hf_prune import PruningCallback, PruningConfig
from hf_prune.core.masks import unstructured_mask
from hf_prune.training.callback import UnsupportedTrainingSetupError
from hf_prune.training.sharded import local, lowest_k, order_keys
from hf_prune.training.state import gradual_nm_mask

TESTS = Path(__file__).resolve().parent
STEPS, SAVE_AT, GLOBAL_BATCH, SEQLEN = 8, 4, 4, 16


METHODS = ["gmp", "movement", "gmp-2:4"]


def config(method: str) -> PruningConfig:
    """``"gmp"``, ``"movement"`` at 60%; ``"<method>-2:4"``: N:M reached gradually."""
    if method.endswith("-2:4"):
        return PruningConfig(method=method[:-4], structure="2:4", start_step=0, end_step=6, update_every=2)
    return PruningConfig(method=method, sparsity=0.6, start_step=0, end_step=6, update_every=2)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQLEN), generator=torch.Generator().manual_seed(100 + step))


def train(method: str, out: str, rank: int = 0, size: int = 1, start: int = 0, resume: str | None = None,
          **callback_kwargs) -> dict:
    """Train build("llama") for STEPS steps (from ``start``, resuming from ``resume``) with `PruningCallback`,
    sharded with fully_shard over ``size`` processes; this rank's rows of the global batch. Returns the whole
    masks, weights (as a dict of tensors), the callback's history and the masked weights that are not zero."""
    from safetensors.torch import load_file, save_file
    from transformers import TrainerControl, TrainerState

    model = build("llama").train()
    if resume is not None:
        model.load_state_dict(load_file(f"{resume}/weights.safetensors"), strict=False)
    if size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (size,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cb = PruningCallback(config(method), verbose=False, resume_from=resume, **callback_kwargs)
    args = SimpleNamespace(output_dir=out, resume_from_checkpoint=None, fsdp="", fsdp_config={}, deepspeed=None)
    state = TrainerState(max_steps=STEPS, global_step=start, is_world_process_zero=rank == 0)
    control = TrainerControl()
    cb.on_train_begin(args, state, control, model=model, optimizer=opt)
    per = GLOBAL_BATCH // size
    for step in range(start, STEPS):
        ids = batch(step)[rank * per:(rank + 1) * per]
        model(input_ids=ids, labels=ids).loss.backward()
        cb.on_pre_optimizer_step(args, state, control)
        opt.step()
        cb.on_optimizer_step(args, state, control)
        opt.zero_grad()
        state.global_step += 1
        cb.on_step_end(args, state, control, optimizer=opt)
        if state.global_step == SAVE_AT:
            folder = f"{out}/checkpoint-{SAVE_AT}"
            weights = {n: _whole(p) for n, p in model.named_parameters()}
            if rank == 0:
                os.makedirs(folder, exist_ok=True)
                save_file({n: w.contiguous() for n, w in weights.items()}, f"{folder}/weights.safetensors")
            cb.on_save(args, state, control)
    cb.on_train_end(args, state, control, model=model)
    leaks = sum(int(torch.count_nonzero(local(e.param.data)[~e.mask])) for e in cb.masks.params.values())
    masks = {f"mask/{n}": cb.masks.gather(n, e.mask).to(torch.uint8) for n, e in cb.masks.params.items()}
    weights = {f"weight/{n}": _whole(p).contiguous() for n, p in model.named_parameters()}
    rows = {n: list(e.mask.shape) for n, e in cb.masks.params.items()}
    return {"tensors": {**masks, **weights}, "history": cb.history, "leaks": leaks, "sharded": cb.masks.sharded,
            "local_shapes": rows,
            "sparsity": cb.masks.sparsity(), "report_sparsity": cb.report.achieved_sparsity}


def _whole(p: torch.Tensor) -> torch.Tensor:
    return p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()


def ranking_cases() -> list[tuple[str, torch.Tensor, int]]:
    """(kind, whole scores [13, 8], k or N:M fraction index): ties included (small integers)."""
    gen = torch.Generator().manual_seed(7)
    continuous = torch.randn(13, 8, generator=gen)
    ties = torch.randint(0, 4, (13, 8), generator=gen).float()
    return [("layer", continuous, 50), ("layer", ties, 50), ("layer", ties, 0), ("layer", -ties, 103),
            ("nm", continuous, 1), ("nm", ties, 1)]


SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[2])
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    dist.init_process_group("gloo")
    from hf_prune.training.sharded import lowest_k
    from hf_prune.training.state import gradual_nm_mask
    from hf_prune.core.masks import nm_mask
    from test_training_fsdp import METHODS, ranking_cases, train

    out = sys.argv[1]
    rank, size = dist.get_rank(), dist.get_world_size()
    info = {}
    # the exact ranking over row shards (rows split as FSDP2 does: torch.chunk)
    got = {}
    for j, (kind, scores, k) in enumerate(ranking_cases()):
        rows = torch.chunk(torch.arange(scores.shape[0]), size)[rank]
        mine = scores[rows]
        if kind == "layer":
            pruned = lowest_k([mine], [k])[0]
        else:
            keep_nm = nm_mask(mine, 2, 4)
            dropped = torch.tensor([int((~keep_nm).sum())])
            dist.all_reduce(dropped)
            cand = torch.where(keep_nm, torch.full_like(mine, float("inf")), mine)
            pruned = lowest_k([cand], [int(0.5 * int(dropped))])[0]
        got[f"case{j}"] = pruned.to(torch.uint8)
    save_file(got, f"{out}/ranking-rank{rank}.safetensors")
    for method in METHODS:
        run = train(method, f"{out}/{method}", rank, size)
        resumed = train(method, f"{out}/{method}-resumed", rank, size, start=4, resume=f"{out}/{method}/checkpoint-4")
        if rank == 0:
            save_file(run["tensors"], f"{out}/{method}.safetensors")
            save_file(resumed["tensors"], f"{out}/{method}-resumed.safetensors")
        info[method] = {k: v for k, v in run.items() if k != "tensors"}
        info[method + "-resumed"] = {k: v for k, v in resumed.items() if k != "tensors"}
    # sharded in ways the callback cannot read: a clear error on every rank
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor
    from hf_prune.training.state import MaskState
    from test_training_fsdp import config
    from tiny_models import build
    errors = {}
    mesh = init_device_mesh("cpu", (size,))
    replicated = build("llama")
    for module in replicated.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(distribute_tensor(module.weight.data, mesh, [Replicate()]))
    gpt2 = build("gpt2")
    for block in gpt2.transformer.h:
        fully_shard(block, mesh=mesh)
    for name, model in (("replicated", replicated), ("gpt2_conv1d", gpt2)):
        try:
            MaskState(model, config("gmp"))
            errors[name] = None
        except Exception as exc:
            errors[name] = [type(exc).__name__, str(exc)]
    info["errors"] = errors
    json.dump(info, open(f"{out}/rank{rank}.json", "w"))
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    run_two_processes(SCRIPT, out, str(TESTS))
    return out


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.timeout(200)
def test_sharded_ranking_is_exact(fsdp_run: Path) -> None:
    parts = [_load(fsdp_run / f"ranking-rank{r}.safetensors") for r in (0, 1)]
    for j, (kind, scores, k) in enumerate(ranking_cases()):
        got = ~torch.cat([p[f"case{j}"].bool() for p in parts])
        if kind == "layer":  # the k lowest, ties by position: as unstructured_mask(..., group="layer") ranks
            expected = torch.ones(scores.numel(), dtype=torch.bool)
            expected[scores.flatten().argsort(stable=True)[:k]] = False
            expected = expected.view_as(scores)
        else:
            expected = gradual_nm_mask(scores, 2, 4, 0.5)
        assert torch.equal(got, expected), (kind, k)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_masks_equal_one_process(fsdp_run: Path, method: str, tmp_path) -> None:
    ref = train(method, str(tmp_path))
    got = _load(fsdp_run / f"{method}.safetensors")
    infos = [json.loads((fsdp_run / f"rank{r}.json").read_text())[method] for r in (0, 1)]
    assert infos[0]["sharded"] and infos[1]["sharded"] and not ref["sharded"]
    for name, shape in ref["local_shapes"].items():  # each rank holds its rows of every mask
        assert infos[0]["local_shapes"][name][0] + infos[1]["local_shapes"][name][0] == shape[0]
        assert 0 < infos[1]["local_shapes"][name][0] < shape[0]
    assert infos[0]["leaks"] == infos[1]["leaks"] == 0  # masked weights exactly zero on every shard
    assert infos[0]["history"] == infos[1]["history"] == ref["history"]
    assert infos[0]["sparsity"] == infos[1]["sparsity"] == pytest.approx(ref["sparsity"])
    assert infos[0]["report_sparsity"] == pytest.approx(ref["report_sparsity"])
    for key, value in ref["tensors"].items():
        if key.startswith("mask/"):
            assert torch.equal(got[key], value), f"{method}: {key} differs from the single-process mask"
        else:
            assert torch.allclose(got[key], value, rtol=1e-4, atol=1e-5), f"{method}: {key}"
    masks = [v for k, v in got.items() if k.startswith("mask/")]
    final = 0.5 if method.endswith("2:4") else 0.6
    assert 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks) == pytest.approx(final, abs=2e-3)
    if method.endswith("2:4"):
        from hf_prune.core.masks import is_nm_sparse

        assert all(is_nm_sparse(m.float(), 2, 4) for m in masks)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_checkpoint_and_resume(fsdp_run: Path, method: str, tmp_path) -> None:
    folder = fsdp_run / method / f"checkpoint-{SAVE_AT}"
    saved = _load(folder / "hf_prune_masks.safetensors")
    meta = json.loads((folder / "hf_prune_state.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == SAVE_AT
    whole = _load(folder / "weights.safetensors")
    for key, mask in saved.items():
        if key.startswith("mask/"):
            assert mask.shape == whole[key[5:]].shape  # whole tensors, not rank 0's shard
    uninterrupted = _load(fsdp_run / f"{method}.safetensors")
    resumed = _load(fsdp_run / f"{method}-resumed.safetensors")
    for key, value in uninterrupted.items():
        assert torch.allclose(resumed[key].float(), value.float(), rtol=1e-5, atol=1e-6), key
    # another number of processes: a clear error, or a resharded resume when asked for
    with pytest.raises(UnsupportedTrainingSetupError, match="written by 2 process"):
        train(method, str(tmp_path / "a"), start=SAVE_AT, resume=str(folder))
    one = train(method, str(tmp_path / "b"), start=SAVE_AT, resume=str(folder), on_world_size_change="reshard")
    assert one["leaks"] == 0


@pytest.mark.timeout(200)
@pytest.mark.parametrize(("case", "words"), [("replicated", "Replicate()"), ("gpt2_conv1d", "Conv1D")])
def test_shardings_the_callback_cannot_read(fsdp_run: Path, case: str, words: str) -> None:
    for rank in (0, 1):
        got = json.loads((fsdp_run / f"rank{rank}.json").read_text())["errors"][case]
        assert got is not None and got[0] == "UnsupportedModelError" and words in got[1], got


def test_order_keys_and_lowest_k_in_one_process() -> None:
    x = torch.tensor([3.0, -1.0, float("inf"), -0.0, 0.0, -float("inf"), 2.5])
    assert torch.equal(order_keys(x).argsort(stable=True), x.argsort(stable=True))
    s = torch.tensor([[1.0, 1.0, 0.0], [1.0, 2.0, 1.0]])
    assert (~lowest_k([s], [3])[0]).int().tolist() == [[0, 0, 0], [1, 1, 1]]
    assert torch.equal(~lowest_k([s], [3])[0], unstructured_mask(s, 0.5, group="layer"))


def test_fsdp1_and_deepspeed_are_refused() -> None:
    cb = PruningCallback(config("gmp"), verbose=False)
    model = build("llama")
    from transformers import TrainerControl, TrainerState

    args = SimpleNamespace(output_dir="x", resume_from_checkpoint=None, fsdp="full_shard", fsdp_config={"version": 1},
                           deepspeed=None)
    with pytest.raises(UnsupportedTrainingSetupError, match="FSDP2 only.*no parameter is a DTensor.*FSDP1"):
        cb.on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=None)
    args.fsdp, args.deepspeed = "", "ds_config.json"
    with pytest.raises(UnsupportedTrainingSetupError, match="FSDP2"):
        cb.on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=None)
