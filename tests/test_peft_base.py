"""Pruning a `peft.PeftModel`: one-shot pruning and `PruningCallback` prune and mask the frozen base layers and
never the adapters (``lora_A``/``lora_B``)."""

from __future__ import annotations

import pytest
import torch
from test_training_common import token_dataset, training_args
from tiny_models import build, calib_ids

import hf_prune
from hf_prune.core.model import find_blocks, iter_prunable

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "gate_proj"], "gpt2": ["c_attn", "c_fc"], "qwen3": ["q_proj", "down_proj"]}


def _names(model) -> list[str]:
    prefix, blocks = find_blocks(model)
    return [layer.name for i, b in enumerate(blocks) for layer in iter_prunable(b, f"{prefix}.{i}", None, [])]


def _lora(model, arch: str, seed: int = 1):
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch],
                                                    fan_in_fan_out=arch == "gpt2"))
    torch.manual_seed(seed)
    for name, p in pm.named_parameters():
        if "lora_B" in name:  # LoRA starts with B = 0; a trained adapter does not
            torch.nn.init.normal_(p, std=0.02)
    return pm


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_prunable_layers_of_a_peft_model_are_the_base_layers(arch: str) -> None:
    plain = _names(build(arch))
    wrapped = _names(_lora(build(arch), arch))
    assert not any("lora_" in n or "base_layer" in n for n in wrapped)
    assert [n.split("base_model.model.", 1)[-1] for n in wrapped] == plain


@pytest.mark.parametrize("arch, method", [("llama", "wanda"), ("gpt2", "sparsegpt"), ("qwen3", "magnitude")])
def test_oneshot_on_peft_model_prunes_base_only(arch: str, method: str) -> None:
    pm = _lora(build(arch), arch)
    adapters = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    report = hf_prune.prune(pm, hf_prune.PruningConfig(method=method, sparsity=0.5), calibration=calib_ids(),
                            verbose=False, show_progress=False)
    assert report.achieved_sparsity == pytest.approx(0.5, abs=0.01)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            assert torch.equal(p.detach(), adapters[n]), f"{n}: an adapter weight was changed by pruning"
    for module in pm.modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            w = module.get_base_layer().weight
            assert (w == 0).float().mean() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_callback_on_peft_model_keeps_the_oneshot_mask_of_the_base(tmp_path, arch: str) -> None:
    from transformers import Trainer

    model = build(arch)
    hf_prune.prune(model, hf_prune.PruningConfig(method="wanda", structure="2:4"), calibration=calib_ids(),
                   verbose=False, show_progress=False)
    zeros = {n: (p == 0).clone() for n, p in model.named_parameters() if p.dim() == 2 and (p == 0).any()}
    pm = _lora(model, arch)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    cb = hf_prune.PruningCallback(hf_prune.PruningConfig(method="wanda", structure="2:4"), verbose=False)
    trainer = Trainer(model=pm, args=training_args(tmp_path, max_steps=4), train_dataset=token_dataset(),
                      callbacks=[cb])
    trainer.train()
    assert cb.masks.params, "the callback masked nothing"
    assert not any("lora_" in n for n in cb.masks.params), "the callback must not mask adapter weights"
    changed = [n for n, p in pm.named_parameters() if "lora_" in n and not torch.equal(p.detach(), before[n])]
    assert changed, "the adapters did not train"
    base = pm.get_base_model()
    for n, p in base.named_parameters():
        key = n.replace(".base_layer", "")
        if key in zeros:
            assert torch.equal(p == 0, zeros[key]), f"{n}: the base's zeros changed during LoRA training"
