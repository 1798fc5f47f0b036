"""LoRA training with pruning in the real trainers: trl's `SFTTrainer` and 2-process DDP (torchrun, gloo), for
``MaskedLoraConfig`` on a 2:4 base (the effective weights stay exactly 2:4) and for ``method="loraprune"``
(identical cuts on every rank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import SAMPLE_TEXT, build, calib_ids, tiny_tokenizer

import hf_prune

peft = pytest.importorskip("peft")
TESTS = Path(__file__).resolve().parent


def _pruned_24():
    model = build("llama")
    hf_prune.prune(model, hf_prune.PruningConfig(method="wanda", structure="2:4"), calibration=calib_ids(),
                   verbose=False, show_progress=False)
    return model


def _effective_is_24(pm) -> bool:
    """Every masked-LoRA layer's effective weight ``W + s (B A) * M`` keeps the base's zeros (so stays 2:4)."""
    from hf_prune.peft import MaskedLoraLayer

    checked = 0
    for module in pm.modules():
        if isinstance(module, MaskedLoraLayer):
            base = module.get_base_layer().weight
            delta = module.get_delta_weight("default")
            effective = base + delta
            if not torch.equal(effective == 0, base == 0):
                return False
            checked += 1
    return checked > 0


def _sft(model, tmp_path, callbacks):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    texts = [SAMPLE_TEXT[i * 97:(i * 97) + 160] for i in range(16)]
    args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=8, per_device_train_batch_size=4,
                         learning_rate=5e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, max_length=32,
                         dataset_text_field="text", packing=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=tok, callbacks=callbacks)
    trainer.train()
    return trainer


def test_sft_trainer_masked_lora_keeps_2_4(tmp_path) -> None:
    from hf_prune.peft import MaskedLoraConfig

    pm = peft.get_peft_model(_pruned_24(), MaskedLoraConfig(r=8, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    _sft(pm, tmp_path, [])
    assert any(not torch.equal(p.detach(), before[n]) for n, p in pm.named_parameters() if "lora_" in n)
    assert _effective_is_24(pm)
    merged = pm.merge_and_unload()
    for name, p in merged.named_parameters():
        if p.dim() == 2 and "layers" in name:
            assert (p.view(-1, 4) != 0).sum(1).max() <= 2, f"{name} is not 2:4 after the merge"


def test_sft_trainer_loraprune(tmp_path) -> None:
    pm = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules="all-linear"))
    cb = hf_prune.PruningCallback(hf_prune.PruningConfig(method="loraprune", sparsity=0.2, start_step=2, end_step=6,
                                                         update_every=2), verbose=False)
    _sft(pm, tmp_path, [cb])
    assert cb.report.achieved_fraction == pytest.approx(0.2, abs=0.06)
    assert pm.get_base_model().config.pruning_config["method"] == "loraprune"


SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import peft, torch
    from test_training_common import token_dataset, training_args
    from tiny_models import build, calib_ids
    from transformers import Trainer
    import hf_prune
    from hf_prune.peft import MaskedLoraConfig

    out, case = sys.argv[1], sys.argv[2]
    model = build("llama")
    callbacks = []
    if case == "masked_lora":
        hf_prune.prune(model, hf_prune.PruningConfig(method="wanda", structure="2:4"), calibration=calib_ids(),
                       verbose=False, show_progress=False)
        pm = peft.get_peft_model(model, MaskedLoraConfig(r=4, target_modules="all-linear"))
    else:
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
        score = "fisher" if case == "loraprune-fisher" else "lora"
        callbacks.append(hf_prune.PruningCallback(hf_prune.PruningConfig(
            method="loraprune", sparsity=0.2, start_step=2, end_step=6, update_every=2,
            loraprune_importance=score), verbose=False))
    trainer = Trainer(model=pm, args=training_args(out, max_steps=8, ddp_backend="gloo", gradient_accumulation_steps=2),
                      train_dataset=token_dataset(32), callbacks=callbacks)
    trainer.train()
    rank = trainer.args.process_index
    merged = pm.merge_and_unload()
    zeros = sum(int((p == 0).sum()) for n, p in merged.named_parameters() if p.dim() == 2 and "layers" in n)
    shapes = {{n: list(p.shape) for n, p in merged.named_parameters()}}
    checksum = float(sum(p.double().abs().sum() for p in merged.parameters()))
    held = callbacks[0].algorithm.importance() if callbacks else {{}}
    importance = [float(v.double().sum()) for i in sorted(held) for _, v in sorted(held[i].items())]
    json.dump(dict(rank=rank, world=trainer.args.world_size, zeros=zeros, shapes=shapes, checksum=checksum,
                   importance=importance,
                   distributed=torch.distributed.is_initialized()), open(f"{{out}}/rank{{rank}}.json", "w"))
""")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["masked_lora", "loraprune", "loraprune-fisher"])
def test_ddp_two_processes(tmp_path, case: str) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), case]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=290)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2 and r0["distributed"] and r1["distributed"]
    assert r0["shapes"] == r1["shapes"] and r0["zeros"] == r1["zeros"]
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=1e-6)  # the same weights on both ranks
    dense = build("llama")
    full = {n: list(p.shape) for n, p in dense.named_parameters()}
    if case.startswith("loraprune"):
        # the ranks trained on different batches; their scores agree only if summed over the processes
        assert r0["importance"] and r0["importance"] == pytest.approx(r1["importance"], rel=1e-5)
        assert sum(torch.Size(s).numel() for s in r0["shapes"].values()) < sum(p.numel() for p in dense.parameters())
    else:
        assert r0["shapes"] == full
        layers = sum(p.numel() for n, p in dense.named_parameters() if p.dim() == 2 and "layers" in n)
        assert r0["zeros"] == layers // 2  # exactly 2:4 after training and merge
