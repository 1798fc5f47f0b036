"""LoRA on pruned models keeps the zeros: `hf_prune.peft.MaskedLoraConfig` (masked training, exact merge) and
`hf_prune.peft.merge_and_unload` (masked merge of plain LoRA), against stock peft, which fills the zeros."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from tiny_models import build, calib_ids  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import hf_prune  # noqa: E402
from hf_prune import ConfigError, PruningConfig, UnsupportedModelError  # noqa: E402
from hf_prune.core.masks import is_nm_sparse  # noqa: E402
from hf_prune.peft import MaskedLoraConfig, MaskedLoraLayer, MaskMismatchError, merge_and_unload  # noqa: E402

PRUNINGS = {
    "unstructured": PruningConfig(method="magnitude", sparsity=0.5),
    "2:4": PruningConfig(method="magnitude", structure="2:4"),
}


def pruned(arch: str, structure: str | None = "unstructured") -> torch.nn.Module:
    model = build(arch)
    if structure is not None:
        model.prune(PRUNINGS[structure], verbose=False, show_progress=False)
    return model


def adapter_config(kind: str, **kw) -> PeftConfig:
    if kind == "masked":
        return MaskedLoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, **kw)
    with warnings.catch_warnings():  # peft notes that GPT-2's Conv1D needs fan_in_fan_out and sets it
        warnings.simplefilter("ignore")
        return LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, **kw)


def tuner_layers(peft_model) -> dict[str, BaseTunerLayer]:
    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, BaseTunerLayer)}


def out_in(module: torch.nn.Module) -> torch.Tensor:
    """A layer's weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def reference(base: torch.nn.Module, peft_model, adapters: list[str]) -> torch.nn.Module:
    """A copy of ``base`` with every adapter's update applied by hand: ``W + sum(scale * B @ A) ⊙ (W != 0)``."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in tuner_layers(peft_model).items():
            delta = 0
            for a in adapters:
                if isinstance(layer, MaskedLoraLayer) and a in layer.masked_lora_A:
                    delta = delta + layer.scaling[a] * layer.masked_lora_B[a] @ layer.masked_lora_A[a]
                elif not isinstance(layer, MaskedLoraLayer) and a in layer.lora_A:
                    delta = delta + layer.scaling[a] * layer.lora_B[a].weight @ layer.lora_A[a].weight
            w = out_in(ref.get_submodule(name))
            w += delta * (w != 0)
    return ref


def zeros_of(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    return {n: (model.get_submodule(n).weight == 0).clone() for n in names}


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def test_stock_peft_merge_fills_the_zeros() -> None:
    base = pruned("llama")
    pm = get_peft_model(base, adapter_config("lora"))
    names = list(tuner_layers(pm))
    before = sum(int(z.sum()) for z in zeros_of(base, names).values())
    merged = pm.merge_and_unload()
    after = sum(int(z.sum()) for z in zeros_of(merged, names).values())
    assert before > 0 and after < before * 0.01  # the dense B @ A lands on (almost) every pruned weight


@pytest.mark.parametrize("arch,structure,kind", [
    (arch, structure, kind) for arch in ("llama", "gpt2") for structure in ("unstructured", "2:4")
    for kind in ("masked", "lora")
] + [("qwen3", "unstructured", "masked")])
def test_merge_keeps_exact_zeros_and_equals_the_masked_math(arch: str, structure: str, kind: str, capsys) -> None:
    base = pruned(arch, structure)
    base_copy = copy.deepcopy(base)
    ids = calib_ids(2, 16)
    pm = get_peft_model(base, adapter_config(kind))
    names = list(tuner_layers(pm))
    zeros = zeros_of(base_copy, names)
    expected = logits(reference(base_copy, pm, ["default"]), ids)
    unmerged = logits(pm, ids)
    merged = merge_and_unload(pm)
    assert f"kept all {sum(int(z.sum()) for z in zeros.values())} zeros" in capsys.readouterr().out
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    for name in names:
        w = merged.get_submodule(name).weight
        assert torch.equal(w == 0, zeros[name]), name
        assert not torch.equal(w, base_copy.get_submodule(name).weight), name  # the adapter did change it
        if structure == "2:4":
            assert is_nm_sparse(out_in(merged.get_submodule(name)), 2, 4), name
    got = logits(merged, ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if kind == "masked":  # masked LoRA already masks in its forward: merging changes nothing
        torch.testing.assert_close(got, unmerged, atol=1e-5, rtol=0)


def test_bf16_base_keeps_its_zeros() -> None:
    base = build("llama", dtype=torch.bfloat16)
    base.prune(PRUNINGS["2:4"], verbose=False, show_progress=False)
    pm = get_peft_model(base, adapter_config("masked"))
    names = list(tuner_layers(pm))
    zeros = zeros_of(base, names)
    ids = calib_ids(2, 16)
    unmerged = logits(pm, ids)
    merged = merge_and_unload(pm, verbose=False)
    for name in names:
        w = merged.get_submodule(name).weight
        assert w.dtype == torch.bfloat16 and torch.equal(w == 0, zeros[name]) and is_nm_sparse(w, 2, 4), name
    torch.testing.assert_close(logits(merged, ids).float(), unmerged.float(), atol=0.1, rtol=0.05)


def test_several_lora_adapters_merge_together() -> None:
    base = pruned("llama")
    base_copy = copy.deepcopy(base)
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False),
                        adapter_name="first")
    pm.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    pm.base_model.set_adapter(["first", "second"])
    names = list(tuner_layers(pm))
    zeros = zeros_of(base_copy, names)
    ids = calib_ids(2, 16)
    expected = logits(reference(base_copy, pm, ["first", "second"]), ids)
    merged = merge_and_unload(pm, verbose=False)
    assert all(torch.equal(merged.get_submodule(n).weight == 0, zeros[n]) for n in names)
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,structure", [("llama", "2:4"), ("gpt2", "unstructured")])
def test_training_keeps_the_effective_weights_on_the_pattern(arch: str, structure: str) -> None:
    pm = get_peft_model(pruned(arch, structure), MaskedLoraConfig(r=4, target_modules="all-linear"))
    frozen = {n: m.get_base_layer().weight.detach().clone() for n, m in tuner_layers(pm).items()}
    params = [p for p in pm.parameters() if p.requires_grad]
    assert params and all("masked_lora_" in n for n, p in pm.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = calib_ids(4, 16)
    pm.train()
    for _ in range(3):
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, layer in tuner_layers(pm).items():
        w = layer.get_base_layer().weight
        assert torch.equal(w, frozen[name]), name  # the base stays frozen
        b, a = layer.masked_lora_B["default"], layer.masked_lora_A["default"]
        assert b.abs().sum() > 0, name
        dense = (b @ a).detach()
        pruned_positions = out_in(layer.get_base_layer()) == 0
        assert (dense[pruned_positions] != 0).any(), name  # unmasked, the update would fill the zeros
        effective = w + layer.get_delta_weight("default").detach()
        assert torch.equal(effective == 0, w == 0), name
        if structure == "2:4":
            assert is_nm_sparse(effective.t() if layer.fan_in_fan_out else effective, 2, 4), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_round_trip_through_peft(tmp_path, arch: str) -> None:
    pm = get_peft_model(pruned(arch), adapter_config("masked"))
    ids = calib_ids(2, 16)
    expected = logits(pm, ids)
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MASKED_LORA"
    assert set(saved["mask_fingerprints"]) == set(tuner_layers(pm))
    loaded = PeftModel.from_pretrained(pruned(arch), tmp_path)
    assert isinstance(loaded.peft_config["default"], MaskedLoraConfig)
    assert torch.equal(logits(loaded, ids), expected)


@pytest.mark.parametrize("other,match", [
    ("2:4", "same count, different positions"),  # 50% either way, other positions
    (None, "in 14 of 14 layers .*this base has 8192 of 8192"),  # the dense base
])
def test_loading_onto_another_zero_pattern_raises(tmp_path, other: str | None, match: str) -> None:
    get_peft_model(pruned("llama"), adapter_config("masked")).save_pretrained(tmp_path)
    base = pruned("llama", other)
    with pytest.raises(MaskMismatchError, match=match) as err:
        PeftModel.from_pretrained(base, tmp_path)
    assert "model.layers.0." in str(err.value) and "mask_fingerprints = {}" in str(err.value)
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())  # refused before any change


def test_dense_base_warns_and_still_works() -> None:
    with pytest.warns(UserWarning, match="14 of 14 target layers have no zeros"):
        pm = get_peft_model(build("llama"), MaskedLoraConfig(r=4, target_modules="all-linear"))
    assert logits(pm, calib_ids(1, 8)).isfinite().all()


@pytest.mark.parametrize("kind", ["masked", "lora"])
def test_merged_model_reloads_with_stock_from_pretrained(tmp_path, kind: str) -> None:
    pm = get_peft_model(pruned("llama", "2:4"), adapter_config(kind))
    merged = merge_and_unload(pm, verbose=False)
    ids = calib_ids(2, 16)
    expected = logits(merged, ids)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for name, module in merged.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            w = reloaded.get_submodule(name).weight
            assert torch.equal(w, module.weight) and is_nm_sparse(w, 2, 4), name
    assert torch.equal(logits(reloaded, ids), expected)


def test_lora_on_fused_moe_experts_merges_masked() -> None:
    # MaskedLoraConfig adapts modules; fused experts are 3-D parameters, reached by LoRA's target_parameters.
    base = pruned("qwen3_moe")
    base_copy = copy.deepcopy(base)
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    pm = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], target_parameters=experts,
                                         init_lora_weights=False))
    ids = calib_ids(2, 16)
    ref = copy.deepcopy(base_copy)
    params = {}
    with torch.no_grad():
        for name, layer in tuner_layers(pm).items():
            key = f"{name.replace('.base_layer', '')}.{getattr(layer, 'parameter_name', 'weight')}"
            target = ref.get_parameter(key)
            target += layer.get_delta_weight("default") * (target != 0)
            params[key] = base_copy.get_parameter(key) == 0
    assert any("experts.gate_up_proj" in k for k in params) and any("experts.down_proj" in k for k in params)
    merged = merge_and_unload(pm, verbose=False)
    for key, zeros in params.items():
        assert torch.equal(merged.get_parameter(key) == 0, zeros) and zeros.any(), key
    torch.testing.assert_close(logits(merged, ids), logits(ref, ids), atol=1e-5, rtol=0)


def test_masked_lora_refuses_modules_it_cannot_mask() -> None:
    with pytest.raises(UnsupportedModelError, match="nn.Linear and transformers Conv1D"):
        get_peft_model(pruned("qwen3_moe", None), MaskedLoraConfig(target_modules=["experts"]))


@pytest.mark.parametrize("make,error,match", [
    (lambda: get_peft_model(pruned("llama"), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)),
     ConfigError, "DoRA"),
    (lambda: pruned("llama"), UnsupportedModelError, "PeftModel returned by peft.get_peft_model"),
])
def test_merge_rejects_what_it_cannot_merge_exactly(make, error: type, match: str) -> None:
    model = make()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(error, match=match):
        merge_and_unload(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_unknown_adapter_name() -> None:
    pm = get_peft_model(pruned("llama"), adapter_config("lora"))
    with pytest.raises(ConfigError, match=r"no such adapter \['nope'\]; this model has \['default'\]"):
        merge_and_unload(pm, adapter_names=["nope"])


@pytest.mark.parametrize("kwargs,match", [
    ({"r": 0}, "MaskedLoraConfig.r must be a positive integer"),
    ({"bias": "all"}, "MaskedLoraConfig.bias='all' is not supported"),
])
def test_config_rejects_bad_fields(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MaskedLoraConfig(**kwargs)


def test_registration_is_idempotent(monkeypatch) -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import PeftType

    from hf_prune.peft import masked_lora
    from hf_prune.peft.peft_type import peft_type_member

    members = len(PeftType)
    hf_prune.peft.register()
    assert peft_type_member("MASKED_LORA") is PeftType.MASKED_LORA and len(PeftType) == members
    # after importlib.reload the registered classes are stale copies of the same names: they are replaced
    stale = type("MaskedLoraConfig", (), {"__module__": masked_lora.__name__})
    monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, PeftType.MASKED_LORA, stale)
    hf_prune.peft.register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MASKED_LORA] is MaskedLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MASKED_LORA] is masked_lora.MaskedLoraModel
    # someone else's method of the same name is not overwritten
    monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, PeftType.MASKED_LORA, LoraConfig)
    with pytest.raises(RuntimeError, match="already has a method called 'masked_lora'"):
        hf_prune.peft.register()


def test_import_hook_without_peft_or_with_a_broken_peft(monkeypatch) -> None:
    import importlib
    import importlib.util

    calls = []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "peft" else real_find_spec(name, *a))
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: calls.append(name))
    hf_prune._register_peft_method()
    assert calls == []  # peft absent: not even tried

    def broken(name, *a):
        raise AttributeError("module 'peft.utils' has no attribute 'register_peft_method'")

    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.warns(RuntimeWarning, match=rf"unavailable with peft {peft.__version__}: AttributeError"):
        hf_prune._register_peft_method()
