"""`PruningCallback`: prune during `transformers.Trainer` / trl `SFTTrainer` training.

Lifecycle only; the math lives in `schedules` (target sparsity per step), `state` (masks and enforcement),
`movement` (scores) and `lottery` (rewinding). Per optimizer step:

0. backward: gradient hooks zero masked gradients (before DDP's all-reduce and gradient clipping), except for
   movement pruning, whose scores need the dense gradient of ``W'``;
1. ``on_pre_optimizer_step``: movement scores take the (all-reduced, clipped) gradients; masked gradients
   are zeroed;
2. ``optimizer.step()``;
3. ``on_optimizer_step``: ``W *= mask`` (exact zeros, whatever the optimizer, weight decay or bf16 did);
4. ``on_step_end``: on update steps the masks are recomputed, broadcast from rank 0, the optimizer moments
   of newly masked entries are zeroed, and the weights masked again.

Checkpoints: ``on_save`` writes ``hf_prune_masks.safetensors`` + ``hf_prune_state.json`` into the checkpoint
folder (rank 0, atomically); a resumed run (``state.global_step > 0`` at ``on_train_begin``) reads them back.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from .._version import __version__
from ..config import PruningConfig
from ..errors import CalibrationError, ConfigError, HfPruneError
from ..registry import is_training_only
from . import checkpoint as ckpt
from .lottery import RewindSnapshot
from .movement import MovementScores, soft_mask, soft_threshold
from .schedules import (
    check_schedule,
    is_update_step,
    lottery_round_steps,
    lottery_sparsity,
    schedule_progress,
    target_sparsity,
)
from .state import MaskState, layer_view, world_size

logger = logging.getLogger("hf_prune")

LOG_TARGET = "prune/target_sparsity"
LOG_ACHIEVED = "prune/sparsity"
LOG_THRESHOLD = "prune/threshold"


class UnsupportedTrainingSetupError(HfPruneError, RuntimeError):
    """The Trainer setup (FSDP, DeepSpeed) is one the callback does not support."""


class PruningCallback(TrainerCallback):
    """Prune while training: ``Trainer(..., callbacks=[PruningCallback(PruningConfig(method="gmp", ...))])``.

    Args:
        config: a `PruningConfig` (or a dict of its fields; keyword arguments override fields). Methods:
            ``gmp`` (gradual magnitude), ``movement`` (hard), ``soft_movement``, ``lottery`` (iterative
            magnitude with rewinding), or a one-shot method (``magnitude``, ``wanda``, ``sparsegpt``) whose mask
            is computed once at the start of training and then kept constant.
        calibration, tokenizer: for one-shot methods that need calibration data (as for `hf_prune.prune`). If
            the model was already pruned by `hf_prune.prune` (``model.config.pruning_config`` is set) and no
            calibration is given, its zeros are the constant mask.
        on_missing_state: what a resumed run does when its checkpoint holds no hf_prune state: ``"error"``
            (default) or ``"from_weights"`` (masks = non-zero weights; schedule state restarts at that step).
        resume_from: checkpoint folder to read the pruning state from when resuming (default: the folder passed
            to ``trainer.train(resume_from_checkpoint=...)``, else ``output_dir/checkpoint-<step>``).
        verbose: print the per-layer summary at the end of training.
    """

    def __init__(self, config: PruningConfig | Mapping[str, Any] | None = None, *, calibration: Any = None,
                 tokenizer: Any = None, on_missing_state: str = "error", resume_from: str | None = None,
                 verbose: bool = True, **config_kwargs: Any) -> None:
        if config is None:
            config = PruningConfig.from_dict(config_kwargs)
        elif isinstance(config, Mapping):
            config = PruningConfig.from_dict({**config, **config_kwargs})
        elif isinstance(config, PruningConfig):
            if config_kwargs:
                config = PruningConfig.from_dict({**config.to_dict(), **config_kwargs})
        else:
            raise ConfigError(f"config must be a PruningConfig or a dict, got {type(config).__name__}")
        if on_missing_state not in ("error", "from_weights"):
            raise ConfigError(f"on_missing_state={on_missing_state!r}; allowed: 'error', 'from_weights'")
        self.config: PruningConfig = config
        self.calibration = calibration
        self.tokenizer = tokenizer
        self.on_missing_state = on_missing_state
        self.resume_from = resume_from
        self.verbose = verbose
        self.masks: MaskState | None = None
        self.scores: MovementScores | None = None
        self.rewind = RewindSnapshot()
        self.end_step: int | None = None
        self.target = 0.0
        self.threshold = 0.0
        self.last_update_step: int | None = None
        self.lottery_round = 0
        self.history: list[list[float]] = []  # [step, target, mask sparsity] at every mask update

    # ------------------------------------------------------------------ properties
    @property
    def method(self) -> str:
        return self.config.method

    @property
    def is_one_shot(self) -> bool:
        return not is_training_only(self.method)

    # ------------------------------------------------------------------ lifecycle
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _check_supported(args, model)
        cfg = self.config
        if self.masks is not None:  # the callback is reused for another train() call
            self.masks.remove_grad_hooks()
        self.masks, self.scores, self.rewind = MaskState(model, cfg), None, RewindSnapshot()
        self.target, self.threshold, self.last_update_step, self.lottery_round = 0.0, 0.0, None, 0
        self.end_step = cfg.end_step if cfg.end_step is not None else int(state.max_steps)
        if not self.is_one_shot and self.end_step > state.max_steps > 0:
            logger.warning("hf_prune: end_step=%d is after the Trainer's max_steps=%d: training stops before the final "
                           "sparsity %.3g is reached", self.end_step, state.max_steps, cfg.sparsity)
        if not self.is_one_shot:
            try:
                check_schedule(cfg.schedule, cfg.start_step, self.end_step, cfg.update_every)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (end_step defaults to the Trainer's max_steps={state.max_steps})") from None
            if self.method == "lottery":
                self.round_steps = lottery_round_steps(cfg.start_step, self.end_step, cfg.lottery_rounds)
        if self.method in ("movement", "soft_movement"):
            self.scores = MovementScores(self.masks.params)
        if state.global_step > 0:
            self._resume(args, state, model)
        else:
            self.history = []
            if self.is_one_shot:
                self._one_shot_masks(model)
            else:
                if self.method == "lottery" and cfg.lottery_rewind_step == 0:
                    self.rewind.take(self.masks.params, 0)
                if cfg.start_step == 0:
                    self._update(0, optimizer)
        self.masks.apply_()
        self.masks.mask_optimizer_state_(optimizer)
        if self.scores is None:
            self.masks.register_grad_hooks()
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.masks is None:
            return control
        if self.scores is not None:
            l1 = self.config.movement_l1 if self.method == "soft_movement" else 0.0
            self.scores.step(self.masks.params, self.config.movement_lr, l1)
        if not self.masks.has_grad_hooks or world_size() > 1:
            # the hooks already masked every gradient in place; under DDP the all-reduce may write the bucket
            # back after a hook ran, so mask once more there
            self.masks.mask_grads_()
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.masks is not None:
            self.masks.apply_()
        return control

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.masks is None:
            return control
        step = int(state.global_step)
        if self.method == "lottery" and not self.rewind.taken and step == self.config.lottery_rewind_step:
            self.rewind.take(self.masks.params, step)
        self._update(step, optimizer)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.masks is None or logs is None:
            return control
        extra = {LOG_TARGET: round(self.target, 6), LOG_ACHIEVED: round(self.masks.sparsity(), 6)}
        if self.method == "soft_movement":
            extra[LOG_THRESHOLD] = round(self.threshold, 6)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.masks is None or not state.is_world_process_zero:
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            logger.warning("hf_prune: checkpoint folder %s not found; pruning state not saved", folder)
            return control
        self.save_state(folder, int(state.global_step))
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.masks is None:
            return control
        self.masks.remove_grad_hooks()
        self.masks.apply_()
        sparsity = self.masks.sparsity()
        if getattr(model, "config", None) is not None:
            model.config.pruning_config = {**self.config.to_dict(), "achieved_sparsity": round(sparsity, 6),
                                           "hf_prune_version": __version__}
        if self.verbose and state.is_world_process_zero:
            print(self.summary())
        return control

    # ------------------------------------------------------------------ mask updates
    def _update(self, step: int, optimizer: Any) -> None:
        cfg, masks = self.config, self.masks
        assert masks is not None and self.end_step is not None
        method = self.method
        if self.is_one_shot:
            return
        if method == "lottery":
            if step not in self.round_steps:
                return
            self.lottery_round = self.round_steps.index(step) + 1
            self.target = lottery_sparsity(self.lottery_round, cfg.lottery_rounds, float(cfg.sparsity))
            new = masks.compute(lambda e, layer, w: w.abs().float(), self.target)
        else:
            after_end = method in ("movement", "soft_movement")
            if not is_update_step(step, cfg.start_step, self.end_step, cfg.update_every, after_end=after_end):
                return
            self.target = target_sparsity(step, float(cfg.sparsity), start=cfg.start_step, end=self.end_step,
                                          schedule=cfg.schedule, initial=cfg.initial_sparsity,
                                          update_every=cfg.update_every)
            if method == "gmp":
                new = masks.compute(lambda e, layer, w: w.abs().float(), self.target)
            elif method == "movement" or cfg.nm is not None:
                scores = self.scores.scores  # type: ignore[union-attr]
                new = masks.compute(lambda e, layer, w: layer_view(layer, scores[e.name]), self.target)
            else:  # soft movement, unstructured: threshold on sigmoid(S)
                progress = 1.0 if cfg.schedule == "constant" else schedule_progress(
                    step, cfg.start_step, self.end_step, cfg.update_every)
                self.threshold = soft_threshold(progress, cfg.movement_threshold)
                scores = self.scores.scores  # type: ignore[union-attr]
                # the scheduled sparsity is a cap: the top (1 - target) scores are always kept
                cap = masks.compute(lambda e, layer, w: layer_view(layer, scores[e.name]), self.target)
                new = {n: soft_mask(s, self.threshold) | cap[n] for n, s in scores.items()}
        new = MaskState.broadcast(new)
        if self.scores is not None:
            for name, entry in masks.params.items():
                self.scores.on_mask_change(entry, new[name].to(entry.param.device))
        changed = masks.set_masks(new)
        if method == "lottery":
            if not self.rewind.taken:
                raise HfPruneError(f"lottery round at step {step} but no rewind snapshot (rewind step "
                                   f"{cfg.lottery_rewind_step} was never reached)")
            self.rewind.rewind_(masks.params)
            masks.mask_optimizer_state_(optimizer, reset=True)
        elif changed:
            masks.mask_optimizer_state_(optimizer, changed)
        masks.apply_()
        self.last_update_step = step
        self.history.append([step, round(self.target, 6), round(masks.mask_sparsity(), 6)])

    def _one_shot_masks(self, model: Any) -> None:
        assert self.masks is not None
        from ..api import prune
        from ..registry import get_method

        needs_calib = get_method(self.method).needs_calibration or self.config.owl
        already = bool(getattr(getattr(model, "config", None), "pruning_config", None))
        if self.calibration is not None or (not needs_calib and not already):
            prune(model, self.config, self.calibration, self.tokenizer, verbose=False, show_progress=False)
        elif not already:
            raise CalibrationError(
                f"PruningCallback(method={self.method!r}) needs calibration= (text, dataset or token ids) to compute "
                "the starting mask, or a model already pruned with hf_prune.prune"
            )
        self.masks.set_masks(MaskState.broadcast(self.masks.masks_from_weights()))
        self.target = float(self.config.sparsity)  # type: ignore[arg-type]
        self.history.append([0, round(self.target, 6), round(self.masks.mask_sparsity(), 6)])

    # ------------------------------------------------------------------ checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        assert self.masks is not None
        out: dict[str, torch.Tensor] = {f"mask/{n}": m for n, m in self.masks.masks().items()}
        if self.scores is not None:
            out.update({f"score/{n}": s for n, s in self.scores.scores.items()})
            out.update({f"frozen/{n}": s for n, s in self.scores.frozen.items()})
        if self.rewind.taken:
            out.update({f"rewind/{n}": s for n, s in self.rewind.tensors.items()})
        return out

    def state_meta(self, step: int) -> dict[str, Any]:
        return {
            "step": step, "method": self.method, "config": self.config.to_dict(), "end_step": self.end_step,
            "target_sparsity": self.target, "threshold": self.threshold, "last_update_step": self.last_update_step,
            "lottery_round": self.lottery_round, "rewind_step": self.rewind.step, "history": self.history,
            "hf_prune_version": __version__,
        }

    def save_state(self, folder: str, step: int) -> None:
        """Write masks, scores, rewind weights and schedule state into ``folder``."""
        ckpt.save_state(folder, self.state_tensors(), self.state_meta(step))

    def _resume_dir(self, args: Any, state: Any) -> str | None:
        candidates = [self.resume_from, args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str)
                      else None, _trainer_resume_arg(), os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        for c in candidates:
            if c and os.path.isdir(c):
                return c
        return None

    def _resume(self, args: Any, state: Any, model: Any) -> None:
        assert self.masks is not None
        folder = self._resume_dir(args, state)
        if folder is None or not ckpt.has_state(folder):
            if self.on_missing_state == "from_weights":
                logger.warning("hf_prune: no pruning state to resume from; masks rebuilt from the zeros in the weights")
                self.masks.set_masks(self.masks.masks_from_weights())
                self.target = self.masks.mask_sparsity()
                return
            ckpt.load_state(folder or f"<no checkpoint folder found for step {state.global_step}>")
        tensors, meta = ckpt.load_state(folder)  # type: ignore[arg-type]
        saved = meta.get("config", {})
        for key in ("method", "sparsity", "structure"):
            if saved.get(key) != getattr(self.config, key):
                raise ckpt.MissingPruningStateError(
                    f"resuming from {folder}: it was pruned with {key}={saved.get(key)!r}, this callback has "
                    f"{key}={getattr(self.config, key)!r}; use the same PruningConfig to resume"
                )
        missing = [n for n in self.masks.params if f"mask/{n}" not in tensors]
        if missing:
            raise ckpt.MissingPruningStateError(f"resuming from {folder}: no saved mask for {missing[:3]}")
        self.masks.set_masks({n: tensors[f"mask/{n}"].bool() for n in self.masks.params})
        if self.scores is not None:
            for n, entry in self.masks.params.items():
                self.scores.scores[n] = tensors[f"score/{n}"].to(entry.param.device, torch.float32)
                self.scores.frozen[n] = tensors[f"frozen/{n}"].to(entry.param.device, entry.param.dtype)
        if meta.get("rewind_step") is not None:
            self.rewind.step = int(meta["rewind_step"])
            self.rewind.tensors = {n: tensors[f"rewind/{n}"].to(e.param.device, e.param.dtype)
                                   for n, e in self.masks.params.items()}
        self.target = float(meta.get("target_sparsity", 0.0))
        self.threshold = float(meta.get("threshold", 0.0))
        self.last_update_step = meta.get("last_update_step")
        self.lottery_round = int(meta.get("lottery_round", 0))
        self.history = [list(h) for h in meta.get("history", [])]

    # ------------------------------------------------------------------ reporting
    def summary(self) -> str:
        """Per-layer table: shape, parameters, non-zeros, sparsity."""
        assert self.masks is not None
        rows = self.masks.layer_stats()
        width = max(len(r[0]) for r in rows)
        lines = [f"hf_prune {self.method} {self.config.structure}: target {self.target:.4f}, achieved "
                 f"{self.masks.sparsity():.4f} over {len(rows)} weight tensors",
                 f"{'layer':<{width}}  {'shape':>16}  {'params':>10}  {'nonzero':>10}  sparsity"]
        for name, shape, numel, nonzero in rows:
            lines.append(f"{name:<{width}}  {'x'.join(map(str, shape)):>16}  {numel:>10,}  {nonzero:>10,}  "
                         f"{1 - nonzero / max(numel, 1):.4f}")
        return "\n".join(lines)


def _trainer_resume_arg() -> str | None:
    """The ``resume_from_checkpoint`` folder the running ``Trainer.train`` call received (read off the stack)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name in ("_inner_training_loop", "train"):
                value = frame.f_locals.get("resume_from_checkpoint")
                if isinstance(value, str):
                    return value
            frame = frame.f_back
    finally:
        del frame
    return None


def _check_supported(args: Any, model: Any) -> None:
    if model is None:
        raise HfPruneError("PruningCallback needs the Trainer to pass the model to callbacks")
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise UnsupportedTrainingSetupError(
            "PruningCallback does not support FSDP yet: parameters are sharded (flattened FlatParameter or DTensor), so "
            "per-weight masks would need to be sharded the same way. Use DDP (plain `accelerate launch`), or prune "
            "one-shot before FSDP fine-tuning and re-apply the masks after loading the result"
        )
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"):
        raise UnsupportedTrainingSetupError(
            "PruningCallback does not support DeepSpeed (ZeRO partitions parameters and optimizer state); use DDP"
        )
