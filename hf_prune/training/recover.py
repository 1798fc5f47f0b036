"""PERP recovery after one-shot pruning (Zimmer et al., 2023, "PERP: Rethinking the Prune-Retrain Paradigm in the
Era of LLMs"): retrain only a tiny set of parameters for a few hundred steps and keep the zeros exactly.

What trains (``train=``):

* ``"norms"``: the normalisation weights and every bias (PERP's "biases + LN"); the pruned matrices stay frozen,
  so their zeros cannot move. Typically ~0.01-0.1% of the parameters.
* ``"lora"``: the same plus a masked LoRA adapter (`hf_prune.peft.MaskedLoraConfig`, ``lora_r``, on every
  pruned linear layer); its update is ``(B A) * M`` with ``M`` the base's non-zero pattern, so the merged model
  keeps the zeros exactly. The adapter is merged at the end: the result is a plain transformers model.
* ``"all"``: full fine-tuning with the one-shot zeros as a constant mask (`PruningCallback`), the reference
  PERP compares against.

It runs the real `transformers.Trainer`. Example (tiny model, a few steps)::

    >>> import torch, hf_prune
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> _ = model.prune(hf_prune.PruningConfig(method="magnitude", sparsity=0.5), verbose=False, show_progress=False)
    >>> report = hf_prune.recover(model, torch.randint(0, 100, (8, 16)), steps=2, batch_size=4, show_progress=False)
    >>> report.zeros_kept, report.trainable_fraction < 0.01
    (True, True)
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..core.calibration import build_calibration
from ..core.memory import PeakMemory
from ..errors import ConfigError

TRAIN_MODES = ("norms", "lora", "all")
#: default learning rates per mode (PERP trains biases/norms and LoRA with larger rates than full fine-tuning;
#: 5e-4 for LoRA is the PERP authors' default, and on SmolLM2 it recovers more of the gap in 200 steps than 2e-4,
#: benchmarks/results/peft.md)
DEFAULT_LR = {"norms": 1e-3, "lora": 5e-4, "all": 2e-5}


@dataclass
class RecoveryReport:
    """What `recover` trained and what it kept."""

    train: str
    steps: int
    learning_rate: float
    trainable_params: int
    total_params: int
    first_loss: float
    last_loss: float
    seconds: float
    peak_rss_mb: float
    zeros_before: int
    zeros_after: int
    lora_r: int | None = None
    #: the process's RSS when training started (the model and whatever else the process holds): ``peak_rss_mb -
    #: start_rss_mb`` is what training added (gradients, optimizer state, activations)
    start_rss_mb: float | None = None

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    @property
    def zeros_kept(self) -> bool:
        return self.zeros_after >= self.zeros_before

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trainable_fraction": self.trainable_fraction, "zeros_kept": self.zeros_kept}

    def __str__(self) -> str:
        return (f"hf_prune recover ({self.train}{f', LoRA r={self.lora_r}' if self.lora_r else ''}): {self.steps} "
                f"steps at lr {self.learning_rate:g}, {self.trainable_params:,} of {self.total_params:,} parameters "
                f"trained ({self.trainable_fraction:.3%}); loss {self.first_loss:.3f} -> {self.last_loss:.3f}; "
                f"zeros {self.zeros_before:,} -> {self.zeros_after:,}; {self.seconds:.1f} s, peak RSS "
                f"{self.peak_rss_mb:.0f} MB" + (f" (+{self.peak_rss_mb - self.start_rss_mb:.0f} MB in training)"
                                                if self.start_rss_mb is not None else ""))


def is_norm(module: nn.Module) -> bool:
    """Normalisation layers of any transformers architecture (LayerNorm, RMSNorm variants), by class name."""
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def _zero_pattern(model: nn.Module) -> dict[str, torch.Tensor]:
    """Zero masks (on the CPU) of the matrices that hold zeros, embeddings and output head excluded (their zeros
    are not pruning's, and a tied head changes with the embeddings)."""
    skip = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            skip.add(id(module.weight))
    return {n: (p == 0).cpu() for n, p in model.named_parameters()
            if p.dim() >= 2 and id(p) not in skip and bool((p == 0).any())}


def mark_norms_and_biases_trainable(model: nn.Module) -> int:
    """Freeze everything but normalisation weights and biases; return how many parameters train."""
    for p in model.parameters():
        p.requires_grad_(False)
    count = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if is_norm(module) or name == "bias":
                p.requires_grad_(True)
                count += p.numel()
    return count


def recover(
    model: nn.Module,
    data: Any,
    tokenizer: Any = None,
    *,
    train: str = "norms",
    steps: int = 200,
    learning_rate: float | None = None,
    lora_r: int = 16,
    batch_size: int = 8,
    seqlen: int = 512,
    seed: int = 0,
    gradient_accumulation_steps: int = 1,
    bf16: bool | None = None,
    output_dir: str | None = None,
    show_progress: bool = True,
) -> RecoveryReport:
    """Retrain a pruned model in place for ``steps`` optimizer steps on ``data`` and keep its zeros (see module).

    Args:
        model: a transformers causal LM pruned by hf_prune (or any model with zeros to keep).
        data: text, a file, a list of strings (with ``tokenizer``), a dataset or a LongTensor ``[samples, seqlen]``
            (the calibration formats); ``steps * batch_size`` windows of ``seqlen`` tokens are drawn from it.
        train: ``"norms"``, ``"lora"`` or ``"all"``.
        learning_rate: default per mode (`DEFAULT_LR`).
        lora_r: rank of the masked LoRA adapter (``train="lora"``).
        gradient_accumulation_steps: batches per optimizer step (``steps * batch_size * this`` windows are drawn).
        bf16: bf16 mixed precision (default: when the model's weights are bf16).

    Returns the `RecoveryReport`. With ``train="lora"`` the adapter is merged into ``model``'s weights (masked,
    so the zeros stay).
    """
    if train not in TRAIN_MODES:
        raise ConfigError(f"train={train!r} is not one of {TRAIN_MODES}: 'norms' (norms and biases only), 'lora' "
                          "(plus a masked LoRA adapter) or 'all' (full fine-tuning with a constant mask)")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seqlen", seqlen), ("lora_r", lora_r),
                        ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    lr = DEFAULT_LR[train] if learning_rate is None else learning_rate
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"learning_rate={learning_rate!r} must be a positive number")
    ids = build_calibration(data, tokenizer, steps * batch_size * gradient_accumulation_steps, seqlen, seed)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise ConfigError(f"data: token id {int(ids.max())} is outside the model's vocabulary ({vocab}); was it "
                          "tokenized with another tokenizer?")
    before = _zero_pattern(model)
    if not before:
        import warnings

        warnings.warn("recover: the model has no zero weights; it is not pruned, so there is nothing to keep "
                      "(training goes on)", stacklevel=2)
    zeros_before = sum(int(m.sum()) for m in before.values())

    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from .callback import PruningCallback

    target: nn.Module = model
    callbacks: list = []
    total = sum(p.numel() for p in model.parameters())
    if train == "all":
        cfg = getattr(getattr(model, "config", None), "pruning_config", None)
        if not isinstance(cfg, dict):
            raise ConfigError("train='all' keeps the zeros of a model pruned by hf_prune (its config.pruning_config "
                              "is missing); prune it with hf_prune first, or use train='norms' or 'lora', which "
                              "keep any zeros")
        from ..config import PruningConfig

        # a one-shot method on an already pruned model and no calibration: its zeros are the constant mask
        structure = str(cfg.get("structure") or "unstructured")
        mask_cfg = (PruningConfig(method="wanda", structure=structure) if re.fullmatch(r"\d+:\d+", structure) else
                    PruningConfig(method="wanda", sparsity=min(max(zeros_before / max(total, 1), 0.0), 0.99)))
        callbacks.append(PruningCallback(mask_cfg, verbose=False))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    record = (getattr(getattr(model, "config", None), "pruning_config", None), getattr(model, "_hf_prune_report", None))
    half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    backup: list[tuple[torch.Tensor, torch.Tensor]] = []
    upcast: list[tuple[nn.Parameter, torch.dtype]] = []
    try:
        if train == "all":
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            mark_norms_and_biases_trainable(model)
            backup = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
        if half:
            # no fp32 master weights in a bf16/fp16 model: Adam's small steps would round away (a norm weight near
            # 1.0 does not move by 1e-3 in bf16). The trained parameters run in float32 under autocast.
            for p in model.parameters():
                if p.requires_grad and p.dtype != torch.float32:
                    upcast.append((p, p.dtype))
                    p.data = p.data.float()
        if train == "lora":
            target = _masked_lora(model, lora_r)
        trainable = sum(p.numel() for p in target.parameters() if p.requires_grad)
        dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
        with tempfile.TemporaryDirectory(prefix="hf_prune-recover-") as tmp:
            args = TrainingArguments(
                output_dir=output_dir or tmp, max_steps=steps, per_device_train_batch_size=batch_size,
                learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0,
                logging_steps=max(1, steps // 20), save_strategy="no", report_to=[], seed=seed,
                disable_tqdm=not show_progress, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
                bf16=(half and not any(d == torch.float16 for _, d in upcast)) if bf16 is None else bf16,
                fp16=bf16 is None and any(d == torch.float16 for _, d in upcast) and torch.cuda.is_available(),
                gradient_accumulation_steps=gradient_accumulation_steps,
            )
            trainer = Trainer(model=target, args=args, train_dataset=dataset, callbacks=callbacks)
            if not show_progress:  # with tqdm disabled the Trainer prints every log dict instead
                from transformers import PrinterCallback

                trainer.remove_callback(PrinterCallback)
            with PeakMemory() as mem:
                start = time.perf_counter()
                trainer.train()
                seconds = time.perf_counter() - start
        if train == "lora":
            target.merge_and_unload()  # masked: the zeros stay; the model's modules are plain again
    except BaseException:
        # norms/lora: put back the few trained tensors and remove the adapter, so a failure leaves the model as it
        # was; train="all" leaves the partially trained weights (its zeros are kept by the constant mask)
        if train == "lora" and target is not model:
            target.unload()
        with torch.no_grad():
            for p, value in backup:
                p.copy_(value)
        raise
    finally:
        for cb in callbacks:
            if getattr(cb, "masks", None) is not None:
                cb.masks.remove_grad_hooks()
        for p, dtype in upcast:
            p.data = p.data.to(dtype)
        for p, flag in flags:
            p.requires_grad_(flag)
        if train == "all" and record[0] is not None:  # the callback attached its stand-in config: put back the run's
            model.config.pruning_config = record[0]
            if record[1] is not None:
                model._hf_prune_report = record[1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    after = _zero_pattern(model)
    lost = [n for n, m in before.items() if n not in after or not bool(after[n][m].all())]
    if lost:
        from ..errors import NumericalError

        raise NumericalError(f"recover lost zeros in {len(lost)} weights (first: {lost[0]}); this is a bug, please "
                             "report it with the model class and train mode")
    report = RecoveryReport(
        train=train, steps=steps, learning_rate=float(lr), trainable_params=trainable, total_params=total,
        first_loss=float(losses[0]) if losses else math.nan, last_loss=float(losses[-1]) if losses else math.nan,
        seconds=seconds, peak_rss_mb=mem.peak_rss_mb, start_rss_mb=mem.start_rss_mb, zeros_before=zeros_before,
        zeros_after=sum(int(m.sum()) for m in after.values()), lora_r=lora_r if train == "lora" else None,
    )
    if show_progress:
        print(report)
    return report


def _masked_lora(model: nn.Module, r: int) -> nn.Module:
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("train='lora' needs peft: pip install 'hf_prune[peft]' (or pip install peft)") from exc
    from ..peft import MaskedLoraConfig

    norms = [p for p in model.parameters() if p.requires_grad]  # the same tensors inside the wrapped model
    pm = peft.get_peft_model(model, MaskedLoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    for p in norms:  # get_peft_model freezes the base: norms and biases train along with the adapter
        p.requires_grad_(True)
    return pm
