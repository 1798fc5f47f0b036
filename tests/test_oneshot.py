"""One-shot pruning on tiny random models of every supported architecture family."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import ARCHITECTURES, build, calib_ids

import hf_prune
from hf_prune import PruningConfig
from hf_prune.config import DEFAULT_IGNORE
from hf_prune.core.masks import is_nm_sparse, mask_from_scores
from hf_prune.core.model import find_blocks, iter_prunable
from hf_prune.oneshot.functional import wanda_scores

METHODS = ["magnitude", "wanda", "sparsegpt", "ria", "admm"]
STRUCTURES = ["unstructured", "2:4"]


def _cfg(method: str, structure: str, **kw) -> PruningConfig:
    return PruningConfig(method=method, sparsity=0.5, structure=structure, num_calibration_samples=8, seqlen=32,
                         batch_size=4, **kw)


def _prunable(model) -> list:
    prefix, blocks = find_blocks(model)
    return [layer for i, b in enumerate(blocks) for layer in iter_prunable(b, f"{prefix}.{i}", None, list(DEFAULT_IGNORE))]


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_prune_every_architecture(arch: str, method: str, structure: str) -> None:
    model = build(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calib = calib_ids()
    report = model.prune(_cfg(method, structure), calibration=calib, show_progress=False, verbose=False)

    layers = _prunable(model)
    assert layers, "architecture discovery found nothing to prune"
    assert len(report.layers) == len({layer.report_name for layer in layers})
    for layer in layers:
        w = layer.read_weight()
        if structure == "2:4":
            assert is_nm_sparse(w, 2, 4), layer.name
        zeros = int((w == 0).sum())
        expect = int(w.shape[1] * 0.5) * w.shape[0]  # per-row count (magnitude per layer: same total)
        assert zeros >= expect, f"{layer.name}: {zeros} zeros < {expect}"
        assert zeros <= expect + w.shape[1], f"{layer.name}: pruned too much ({zeros})"
    assert abs(report.achieved_sparsity - 0.5) < 1e-3
    # nothing outside the targets changed: embeddings, norms, lm_head, routers
    pruned_params = {id(layer.param) for layer in layers}
    for name, p in model.named_parameters():
        if id(p) not in pruned_params:
            assert torch.equal(p, before[name]), f"{name} changed but is not a pruning target"
    with torch.no_grad():
        logits = model(calib[:2]).logits
    assert torch.isfinite(logits).all()
    assert model.config.pruning_config["method"] == method


def _naive_sequential_wanda(model, calib: torch.Tensor, nm) -> None:
    """Reference: for each block, run the WHOLE (partially pruned) model, collect input norms, prune."""
    prefix, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        layers = list(iter_prunable(block, f"{prefix}.{i}", None, list(DEFAULT_IGNORE)))
        sums: dict[str, torch.Tensor] = {}

        def hook(name, acc):
            def fn(mod, args):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                acc[name] = acc.get(name, 0) + x.square().sum(0)

            return fn

        handles = [layer.module.register_forward_pre_hook(hook(layer.name, sums)) for layer in layers]
        with torch.no_grad():
            model(input_ids=calib, attention_mask=torch.ones_like(calib), use_cache=False)
        for h in handles:
            h.remove()
        for layer in layers:
            w = layer.read_weight().float()
            layer.write_weight(w * mask_from_scores(wanda_scores(w, sums[layer.name]), 0.5, nm, "row"))


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "qwen3_moe"])
def test_pipeline_matches_naive_sequential_reference(arch: str) -> None:
    """Block-by-block replay (recorded kwargs, per-block masks/rotary) == running the whole model each time."""
    calib = calib_ids()
    fast, slow = build(arch), build(arch)
    fast.prune(_cfg("wanda", "2:4"), calibration=calib, show_progress=False, verbose=False)
    _naive_sequential_wanda(slow, calib, (2, 4))
    for (name, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters()):
        agree = ((a == 0) == (b == 0)).float().mean()
        assert agree > 0.995, f"{name}: masks agree on only {agree:.3%}"


def test_shared_inputs_share_statistics() -> None:
    from hf_prune.oneshot.pipeline import SequentialPruner

    model = build("llama")
    pruner = SequentialPruner(model, _cfg("sparsegpt", "unstructured"), torch.device("cpu"), show_progress=False)
    pruner.run(calib_ids())
    keys = {layer.name.split(".")[-1]: layer.stats_key for layer in pruner.layers[0]}
    assert keys["q_proj"] == keys["k_proj"] == keys["v_proj"] != keys["o_proj"]
    assert keys["gate_proj"] == keys["up_proj"] != keys["down_proj"]


def test_moe_experts_are_pruned_per_expert() -> None:
    model = build("qwen3_moe")
    report = model.prune(_cfg("wanda", "2:4"), calibration=calib_ids(), show_progress=False, verbose=False)
    experts = model.model.layers[0].mlp.experts
    for e in range(experts.gate_up_proj.shape[0]):
        assert is_nm_sparse(experts.gate_up_proj[e], 2, 4)
        assert is_nm_sparse(experts.down_proj[e], 2, 4)
    rows = {r.name: r for r in report.layers}
    row = rows["model.layers.0.mlp.experts.gate_up_proj"]
    assert row.shape[0] == 4 and row.params == experts.gate_up_proj.numel()
    assert model.model.layers[0].mlp.gate.weight.count_nonzero() == model.model.layers[0].mlp.gate.weight.numel()


def test_owl_gives_nonuniform_block_sparsity() -> None:
    model = build("llama")
    with torch.no_grad():  # heavy-tailed (log-normal scaled) weights in block 1 = many outliers
        for p in model.model.layers[1].parameters():
            if p.dim() == 2:
                p.mul_(torch.exp(1.5 * torch.randn_like(p)))
    report = model.prune(_cfg("wanda", "unstructured", owl=True, owl_lambda=0.1, owl_threshold=5.0), calibration=calib_ids(),
                         show_progress=False, verbose=False)
    assert report.block_sparsity is not None
    assert report.block_sparsity[1] < report.block_sparsity[0]
    assert sum(report.block_sparsity) / 2 == pytest.approx(0.5)
    per_block = {}
    for r in report.layers:
        per_block.setdefault(r.block, []).append(r.sparsity)
    assert max(per_block[1]) < min(per_block[0])


def test_layer_sparsity_overrides() -> None:
    model = build("llama")
    report = model.prune(_cfg("magnitude", "unstructured", layer_sparsity={r"mlp\.down_proj": 0.25}),
                         show_progress=False, verbose=False)
    for r in report.layers:
        assert r.sparsity == pytest.approx(0.25 if "down_proj" in r.name else 0.5, abs=1e-3)


def test_magnitude_groups_differ() -> None:
    a, b = build("llama"), build("llama")
    a.prune(_cfg("magnitude", "unstructured", magnitude_group="layer"), show_progress=False, verbose=False)
    b.prune(_cfg("magnitude", "unstructured", magnitude_group="row"), show_progress=False, verbose=False)
    wa, wb = a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight
    assert ((wb == 0).sum(1) == 32).all()
    assert not torch.equal(wa == 0, wb == 0)


def test_device_map_disk_offload_gives_same_result(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = build("llama")
    model.save_pretrained(tmp_path / "dense")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload"), dtype=torch.float32)
    assert offloaded.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    calib = calib_ids()
    for m in (offloaded, reference):
        m.prune(_cfg("sparsegpt", "2:4"), calibration=calib, show_progress=False, verbose=False)
    ref_layers = {layer.name: layer for layer in _prunable(reference)}
    for layer in _prunable(offloaded):
        torch.testing.assert_close(layer.read_weight(), ref_layers[layer.name].read_weight())
    with torch.no_grad():
        torch.testing.assert_close(offloaded(calib[:2]).logits, reference(calib[:2]).logits)


def test_expert_without_tokens_falls_back_to_magnitude() -> None:
    model = build("qwen3_moe")
    gate = model.model.layers[0].mlp.gate
    # Route every token that would go to expert 3 to expert 0 instead, so expert 3 sees no calibration data.
    orig_forward = gate.forward

    def no_expert_3(hidden_states):
        logits, scores, idx = orig_forward(hidden_states)
        idx = torch.where(idx == 3, torch.zeros_like(idx), idx)
        return logits, scores, idx

    gate.forward = no_expert_3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.prune(_cfg("wanda", "2:4"), calibration=calib_ids(), show_progress=False, verbose=False)
    assert any("experts.gate_up_proj[3]" in str(w.message) and "magnitude" in str(w.message) for w in caught)
    assert is_nm_sparse(model.model.layers[0].mlp.experts.gate_up_proj[3], 2, 4)


def test_functional_prune_equals_method() -> None:
    a, b = build("llama"), build("llama")
    calib = calib_ids()
    hf_prune.prune(a, _cfg("wanda", "unstructured"), calibration=calib, show_progress=False, verbose=False)
    b.prune(_cfg("wanda", "unstructured"), calibration=calib, show_progress=False, verbose=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
