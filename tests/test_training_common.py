"""Shared helpers of the training tests (tiny models, tiny datasets, tiny TrainingArguments). No tests here."""

from __future__ import annotations

import torch
from tiny_models import VOCAB, build


def token_dataset(n: int = 16, seqlen: int = 16, seed: int = 0):
    from datasets import Dataset

    ids = torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def training_args(out, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(output_dir=str(out), use_cpu=True, report_to=[], max_steps=8, per_device_train_batch_size=2,
                  learning_rate=5e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                  dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(arch: str, out, callbacks, dataset=None, **overrides):
    from transformers import Trainer

    model = build(arch).train()
    return Trainer(model=model, args=training_args(out, **overrides), train_dataset=dataset or token_dataset(),
                   callbacks=callbacks)


def masked_params(callback):
    """``name -> (weight, mask)`` of every pruned parameter."""
    return {n: (e.param.detach(), e.mask) for n, e in callback.masks.params.items()}


def assert_masked_zero(callback) -> None:
    for name, (w, m) in masked_params(callback).items():
        assert torch.count_nonzero(w[~m]) == 0, f"{name}: masked weights are not zero"
