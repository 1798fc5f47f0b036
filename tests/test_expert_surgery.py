"""Routed-expert removal on transformers v5 fused experts, table-driven over six MoE architectures.

Exactness: a model with experts removed computes the same logits (fp32) as the original model whose router never
picks them, i.e. whose router logits for those experts are -inf (and, for DeepSeek-V3's sigmoid router, whose
selection bias for them is -inf). The reference runs the *original* modules: a torch function mode adds the -inf
to the output of every router's own ``F.linear``.

Reload: uniform counts load with stock transformers (also in a process where hf_prune cannot be imported);
per-layer counts load with hf_prune imported and, without it, through the saved ``modeling_hf_prune.py``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_structured_reload import _run_clean
from tiny_models import MOE_ARCHITECTURES, build_moe, calib_ids
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM

import hf_prune  # noqa: F401  (installs the load hook)
from hf_prune.errors import ConfigError, UnsupportedModelError
from hf_prune.structure.arch import block_specs
from hf_prune.structure.config_io import is_structured
from hf_prune.structure.plan import LayerPlan, StructuredPlan
from hf_prune.structure.surgery import apply_plan

ARCHS = list(MOE_ARCHITECTURES)


class _RouterMask(TorchFunctionMode):
    """Adds ``-inf`` to the removed experts' columns of each router's ``F.linear`` output."""

    def __init__(self, masks: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.masks = masks  # router weight data_ptr -> additive mask [experts]

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.nn.functional.linear and len(args) > 1 and args[1].data_ptr() in self.masks:
            out = out + self.masks[args[1].data_ptr()].to(out.dtype)
        return out


def masked_logits(model: torch.nn.Module, keep: dict[int, list[int]], ids: torch.Tensor) -> torch.Tensor:
    """Logits of (a copy of) ``model`` whose routers never pick experts outside ``keep[block]``."""
    model = copy.deepcopy(model)
    masks = {}
    for spec in block_specs(model):
        if spec.experts is None or spec.index not in keep:
            continue
        router = model.get_submodule(spec.experts.router)
        mask = torch.full((spec.experts.num_experts,), float("-inf"))
        mask[keep[spec.index]] = 0.0
        masks[router.weight.data_ptr()] = mask
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None:  # DeepSeek-V3 picks by sigmoid(logit) + bias: never pick a removed expert
            bias.data += mask
    with torch.no_grad(), _RouterMask(masks):
        return model(ids).logits


def plan_of(keep: dict[int, list[int]]) -> StructuredPlan:
    return StructuredPlan(layers={i: LayerPlan(experts_keep=k) for i, k in keep.items()})


def keeps(model: torch.nn.Module, kind: str, seed: int = 0) -> dict[int, list[int]]:
    """Experts to keep per MoE block: ``uniform`` half of them in every block, ``mixed`` a different count per
    block (group-balanced for group-limited routing)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, spec in enumerate(s for s in block_specs(model) if s.experts is not None):
        e = spec.experts
        per_group = e.num_experts // e.num_group
        count = per_group // 2 if kind == "uniform" else max(2, per_group - 1 - n)
        chosen = []
        for group in range(e.num_group):
            chosen += (torch.randperm(per_group, generator=g)[:count] + group * per_group).tolist()
        out[spec.index] = sorted(chosen)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["uniform", "mixed"])
def test_pruned_logits_equal_masked_router(arch: str, kind: str) -> None:
    model = build_moe(arch)
    ids = calib_ids(2, 12)
    keep = keeps(model, kind)
    assert (len({len(k) for k in keep.values()}) == 1) == (kind == "uniform")
    expected = masked_logits(model, keep, ids)
    with torch.no_grad():
        dense = model(ids).logits
    assert not torch.allclose(expected, dense, atol=1e-4)  # removing experts changes the function
    removed = apply_plan(model, plan_of(keep))
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    for spec in block_specs(model):
        if spec.experts is not None:
            experts = model.get_submodule(spec.experts.experts)
            assert experts.num_experts == spec.experts.num_experts == len(keep[spec.index])
    assert all(v > 0 for v in removed.values()) and set(removed) == set(keep)
    assert is_structured(model.config) == (kind == "mixed")


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_uniform_removal_keeps_load_balancing_loss_working(arch: str) -> None:
    model = build_moe(arch)
    apply_plan(model, plan_of(keeps(model, "uniform")))
    ids = calib_ids(2, 12)
    out = model(ids, labels=ids, output_router_logits=True)
    assert torch.isfinite(out.aux_loss) and torch.isfinite(out.loss)
    assert model.num_experts == 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("experts")
    ids = calib_ids(2, 10)
    torch.save(ids, root / "ids.pt")
    out = {}
    for arch in ARCHS:
        for kind in ("uniform", "mixed"):
            model = build_moe(arch)
            apply_plan(model, plan_of(keeps(model, kind, seed=3)))
            with torch.no_grad():
                logits = model(ids).logits
            folder = root / f"{arch}-{kind}"
            model.save_pretrained(folder)
            out[(arch, kind)] = (folder, logits)
    return out


def test_saved_configs(saved: dict) -> None:
    for (arch, kind), (folder, _) in saved.items():
        config = json.loads((folder / "config.json").read_text())
        assert ("hf_prune_structure" in config) == (kind == "mixed"), arch
        if kind == "mixed":
            layers = config["hf_prune_structure"]["layers"]
            assert config["hf_prune_structure"]["format"] == 2
            assert len({entry["num_experts"] for entry in layers.values()}) >= 1, (arch, layers)
            assert (folder / "modeling_hf_prune.py").is_file() and "auto_map" in config
        else:
            counts = {config.get(f) for f in ("n_routed_experts", "num_local_experts", "num_experts")} - {None}
            assert counts == {4}, (arch, counts)


def test_reload_with_hf_prune_imported(saved: dict) -> None:
    ids = calib_ids(2, 10)
    for (arch, kind), (folder, logits) in saved.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=1e-5, msg=f"{arch} {kind}")


@pytest.mark.parametrize("kind", ["uniform", "mixed"])
def test_reload_without_hf_prune(saved: dict, tmp_path, kind: str) -> None:  # type: ignore[no-untyped-def]
    cases = {arch: value for (arch, k), value in saved.items() if k == kind}
    _run_clean(tmp_path, [folder for folder, _ in cases.values()], trust=kind == "mixed")
    for arch, (folder, logits) in cases.items():
        torch.testing.assert_close(torch.load(folder / "reloaded.pt"), logits, atol=1e-5, rtol=1e-5, msg=arch)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("arch", "layer_plan", "message"), [
    ("mixtral", LayerPlan(experts_keep=[3]), "num_experts_per_tok=2"),
    ("mixtral", LayerPlan(experts_keep=[0, 9]), "out of range"),
    ("deepseek_v3", LayerPlan(experts_keep=[0, 1, 2, 4]), "same number of kept experts in every group"),
    ("deepseek_v3", LayerPlan(experts_keep=[0, 4]), "too few"),
    ("mixtral", LayerPlan(experts_keep=[0, 1], experts_merge_into={2: 5}, experts_frequency=[1.0] * 8),
     "experts_merge_into"),
    ("mixtral", LayerPlan(experts_keep=[0, 1], experts_merge_into={2: 0}, experts_frequency=[1.0] * 3),
     "experts_frequency"),
    ("mixtral", LayerPlan(experts_merge_into={2: 0}, experts_frequency=[1.0] * 8), "needs experts_keep"),
])
def test_bad_expert_plans_are_refused_before_anything_changes(arch: str, layer_plan: LayerPlan, message: str
                                                               ) -> None:
    model = build_moe(arch)
    moe = [s.index for s in block_specs(model) if s.experts is not None]
    before = _state(model)
    plan = StructuredPlan(layers={moe[0]: LayerPlan(experts_keep=[0, 1, 4, 5]), moe[-1]: layer_plan})
    with pytest.raises(ConfigError, match=message):
        apply_plan(model, plan)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_experts_keep_on_a_dense_block_is_refused() -> None:
    model = build_moe("qwen3_moe")  # block 0 is dense (mlp_only_layers=[0])
    with pytest.raises(ConfigError, match="no routed experts"):
        apply_plan(model, plan_of({0: [0, 1]}))


def test_an_expert_sized_tensor_surgery_would_miss_is_refused_before_anything_changes() -> None:
    model = build_moe("mixtral")
    spec = next(s for s in block_specs(model) if s.experts is not None)
    router = model.get_submodule(spec.experts.router)
    router.statics = torch.nn.Module()
    router.statics.register_buffer("e_score_correction_bias", torch.zeros(1, spec.experts.num_experts))
    before = _state(model)
    with pytest.raises(UnsupportedModelError, match="does not slice"):
        apply_plan(model, plan_of({spec.index: [0, 1, 2, 3]}))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_failure_after_the_first_cut_marks_the_model_incomplete(monkeypatch: pytest.MonkeyPatch) -> None:
    import hf_prune.structure.surgery as surgery

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(surgery, "rewrite_config", broken)
    model = build_moe("mixtral")
    with pytest.raises(RuntimeError, match="disk full"):
        apply_plan(model, plan_of(keeps(model, "uniform")))
    assert getattr(model, "_hf_prune_incomplete", False)


def test_removing_blocks_of_a_model_with_leading_dense_blocks_keeps_the_pattern(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for removed, dense_first in (([0], 0), ([2], 1)):
        model = build_moe("deepseek_v3")  # block 0 dense (first_k_dense_replace=1), blocks 1-2 MoE
        apply_plan(model, StructuredPlan(remove_blocks=removed))
        assert model.config.first_k_dense_replace == dense_first and not is_structured(model.config)
        ids = calib_ids(1, 8)
        with torch.no_grad():
            logits = model(ids).logits
        model.save_pretrained(tmp_path / str(removed))
        again = AutoModelForCausalLM.from_pretrained(tmp_path / str(removed))
        with torch.no_grad():
            torch.testing.assert_close(again(ids).logits, logits, atol=1e-5, rtol=1e-5)


def test_per_layer_counts_turn_off_the_router_aux_loss_with_a_warning() -> None:
    model = build_moe("mixtral")
    model.config.output_router_logits = True
    with pytest.warns(UserWarning, match="load-balancing loss"):
        apply_plan(model, plan_of(keeps(model, "mixed")))
    assert model.config.output_router_logits is False
    ids = calib_ids(1, 8)
    assert torch.isfinite(model(ids, labels=ids).loss)
