"""`PruningCallback`: prune during `transformers.Trainer` / trl `SFTTrainer` training.

Lifecycle only: the method is a `hf_prune.training.methods.TrainingMethod` picked from the registry, and the
callback only calls its interface; masks and their enforcement live in `state`. Per optimizer step:

0. backward: gradient hooks zero masked gradients (before DDP's all-reduce and gradient clipping), except for
   methods that need the dense gradient (movement pruning: its scores need the dense gradient of ``W'``);
1. ``on_pre_optimizer_step``: the method sees the (all-reduced, clipped) gradients (movement scores); masked
   gradients are zeroed;
2. ``optimizer.step()``;
3. ``on_optimizer_step``: ``W *= mask`` (exact zeros, whatever the optimizer, weight decay or bf16 did);
4. ``on_step_end``: on update steps the method recomputes the masks, broadcast from rank 0, the optimizer
   moments of newly masked entries are zeroed, and the weights masked again.

Checkpoints: ``on_save`` writes ``hf_prune_masks.safetensors`` + ``hf_prune_state.json`` into the checkpoint
folder (rank 0, atomically); a resumed run (``state.global_step > 0`` at ``on_train_begin``) reads them back.

Processes: DDP keeps whole masks on every rank (rank 0's are broadcast). FSDP2 (``fully_shard``: parameters are
DTensors sharded on dim 0) keeps each rank's rows of the masks and scores, ranks whole matrices exactly across
the shards, and gathers whole tensors for checkpoints (`hf_prune.training.sharded`). FSDP1 and DeepSpeed ZeRO
are refused at ``on_train_begin``.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from .._version import __version__
from ..config import PruningConfig
from ..core.distributed import is_dtensor, is_main_process
from ..core.memory import lifetime_peak_rss_mb
from ..errors import ConfigError, HfPruneError
from ..registry import is_training_only
from ..report import LayerRow, PruningReport, attach_report
from . import checkpoint as ckpt
from .loraprune import base_model_of
from .lottery import RewindSnapshot
from .methods import LOG_THRESHOLD, TrainingMethod, training_method_class
from .movement import MovementScores
from .state import MaskState, world_size

logger = logging.getLogger("hf_prune")

LOG_TARGET = "prune/target_sparsity"
LOG_ACHIEVED = "prune/sparsity"
__all__ = ["LOG_ACHIEVED", "LOG_TARGET", "LOG_THRESHOLD", "PruningCallback", "UnsupportedTrainingSetupError"]


class UnsupportedTrainingSetupError(HfPruneError, RuntimeError):
    """The Trainer setup (FSDP, DeepSpeed) is one the callback does not support."""


class PruningCallback(TrainerCallback):
    """Prune while training: ``Trainer(..., callbacks=[PruningCallback(config)])``.

    Args:
        config: a `PruningConfig` (or a dict of its fields; keyword arguments override fields). Methods:
            ``gmp`` (gradual magnitude), ``movement`` (hard), ``soft_movement``, ``lottery`` (iterative
            magnitude with rewinding), ``loraprune`` (heads and MLP channels of a LoRA-wrapped `peft.PeftModel`,
            removed physically at the end), or a one-shot method (``magnitude``, ``wanda``, ``sparsegpt``) whose mask
            is computed once at the start of training and then kept constant.
        calibration, tokenizer: for one-shot methods that need calibration data (as for `hf_prune.prune`). If
            the model was already pruned by `hf_prune.prune` (``model.config.pruning_config`` is set) and no
            calibration is given, its zeros are the constant mask.
        on_missing_state: what a resumed run does when its checkpoint holds no hf_prune state: ``"error"``
            (default) or ``"from_weights"`` (masks = non-zero weights; schedule state restarts at that step).
        resume_from: checkpoint folder to read the pruning state from when resuming (default: the folder passed
            to ``trainer.train(resume_from_checkpoint=...)``, else ``output_dir/checkpoint-<step>``).
        on_world_size_change: what a resumed run does when its checkpoint was written by another number of
            processes: ``"error"`` (default) or ``"reshard"`` (the state is stored whole, so it is cut for the new
            processes; the data order, and so the sparsity trajectory, then differs from an uninterrupted run).
        verbose: print the per-layer summary at the end of training.
    """

    def __init__(self, config: PruningConfig | Mapping[str, Any] | None = None, *, calibration: Any = None,
                 tokenizer: Any = None, on_missing_state: str = "error", resume_from: str | None = None,
                 on_world_size_change: str = "error", verbose: bool = True, **config_kwargs: Any) -> None:
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
        if on_world_size_change not in ("error", "reshard"):
            raise ConfigError(f"on_world_size_change={on_world_size_change!r}; allowed: 'error', 'reshard'")
        self.on_world_size_change = on_world_size_change
        self.config: PruningConfig = config
        self.method_class = training_method_class(config.method)
        self.calibration = calibration
        self.tokenizer = tokenizer
        self.on_missing_state = on_missing_state
        self.resume_from = resume_from
        self.verbose = verbose
        self.masks: MaskState | None = None
        self.algorithm: TrainingMethod | None = None  # one per train() call, over `masks`
        self.end_step: int | None = None
        self.last_update_step: int | None = None
        self.history: list[list[float]] = []  # [step, target, mask sparsity] at every mask update
        self.report: PruningReport | None = None  # the final masks, set at on_train_end

    # ------------------------------------------------------------------ properties
    @property
    def method(self) -> str:
        return self.config.method

    @property
    def is_one_shot(self) -> bool:
        return not is_training_only(self.method)

    # the method's state, read through the callback (as before the methods were objects)
    @property
    def target(self) -> float:
        """Scheduled sparsity of the current masks."""
        return self.algorithm.target if self.algorithm is not None else 0.0

    @property
    def scores(self) -> MovementScores | None:
        """Movement scores (movement methods), else ``None``."""
        return getattr(self.algorithm, "scores", None)

    @property
    def threshold(self) -> float:
        """Soft movement's current threshold on sigmoid(S) (0 for other methods)."""
        return getattr(self.algorithm, "threshold", 0.0)

    @property
    def rewind(self) -> RewindSnapshot | None:
        """Lottery tickets' rewind snapshot, else ``None``."""
        return getattr(self.algorithm, "rewind", None)

    @property
    def lottery_round(self) -> int:
        """Lottery tickets' last round (0 for other methods)."""
        return getattr(self.algorithm, "lottery_round", 0)

    # ------------------------------------------------------------------ lifecycle
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.method_class.on_trainer_init(model, self.config)
        return control

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _check_supported(args, model)
        cfg = self.config
        if self.masks is not None:  # the callback is reused for another train() call
            self.masks.remove_grad_hooks()
        if self.algorithm is not None:
            self.algorithm.detach()
        self.masks = MaskState(model, cfg, weight_masks=self.method_class.weight_masks)
        self.end_step = cfg.end_step if cfg.end_step is not None else int(state.max_steps)
        self.algorithm = self.method_class(cfg, self.masks, self.end_step)
        self.algorithm.check(int(state.max_steps))
        self.algorithm.set_trainer(args, optimizer)
        self.algorithm.attach(model)
        self.last_update_step, self.history = None, []
        if state.global_step > 0:
            self._resume(args, state, model)
        else:
            if self.algorithm.begin(model, self.calibration, self.tokenizer):
                self._record(0)
            self._update(0, optimizer)  # step 0 is an update step when the schedule starts there
        self.masks.apply_()
        self.masks.mask_optimizer_state_(optimizer)
        if not self.algorithm.needs_dense_grad:
            self.masks.register_grad_hooks()
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.masks is None or self.algorithm is None:
            return control
        self.algorithm.before_optimizer_step()
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
        self._update(int(state.global_step), optimizer)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.masks is None or self.algorithm is None or logs is None:
            return control
        achieved = self.algorithm.achieved()
        extra = {LOG_TARGET: round(self.target, 6),
                 LOG_ACHIEVED: round(self.masks.sparsity() if achieved is None else achieved, 6),
                 **self.algorithm.log_values()}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.masks is None:
            return control
        # under FSDP2 every rank takes part in gathering the whole tensors; rank 0 writes them
        tensors = self.state_tensors() if self.masks.sharded else None
        if not state.is_world_process_zero:
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            logger.warning("hf_prune: checkpoint folder %s not found; pruning state not saved", folder)
            return control
        step = int(state.global_step)
        ckpt.save_state(folder, tensors if tensors is not None else self.state_tensors(), self.state_meta(step))
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.masks is None:
            return control
        self.masks.remove_grad_hooks()
        self.masks.apply_()
        assert self.algorithm is not None
        self.report = self.algorithm.end(model) or self._report(model, args)
        if getattr(model, "config", None) is not None:
            attach_report(model, self.config, self.report)  # save_pretrained writes config + pruning_report.json
            base = base_model_of(model)
            if base is not model:  # a PeftModel: its merged / unloaded model saves the report
                base._hf_prune_report = self.report
        if self.verbose and state.is_world_process_zero:
            print(self.summary())
        return control

    # ------------------------------------------------------------------ mask updates
    def _update(self, step: int, optimizer: Any) -> None:
        assert self.algorithm is not None
        if self.algorithm.update(step, optimizer):
            self.last_update_step = step
            self._record(step)

    def _record(self, step: int) -> None:
        assert self.masks is not None and self.algorithm is not None
        achieved = self.algorithm.achieved()
        self.history.append([step, round(self.target, 6),
                             round(self.masks.mask_sparsity() if achieved is None else achieved, 6)])

    # ------------------------------------------------------------------ checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Masks and the method's tensors (``"<kind>/<parameter name>"``), whole (gathered from the shards under
        FSDP2: a collective, every rank calls it)."""
        assert self.masks is not None and self.algorithm is not None
        out: dict[str, torch.Tensor] = {f"mask/{n}": m for n, m in self.masks.masks().items()}
        out.update(self.algorithm.state_tensors())
        if self.masks.sharded:
            out = {key: self.masks.gather(key.split("/", 1)[1], t) if key.split("/", 1)[-1] in self.masks.params
                   else t for key, t in out.items()}
        return out

    def state_meta(self, step: int) -> dict[str, Any]:
        assert self.algorithm is not None
        return {
            "step": step, "method": self.method, "config": self.config.to_dict(), "end_step": self.end_step,
            "last_update_step": self.last_update_step, "history": self.history, "hf_prune_version": __version__,
            "world_size": world_size(), **self.algorithm.state(),
        }

    def save_state(self, folder: str, step: int) -> None:
        """Write masks, scores, rewind weights and schedule state into ``folder`` (under FSDP2 every rank must
        call it; rank 0 writes)."""
        tensors = self.state_tensors()
        if not is_main_process():
            return
        ckpt.save_state(folder, tensors, self.state_meta(step))

    def _resume_dir(self, args: Any, state: Any) -> str | None:
        # explicit argument, then the TrainingArguments field, then the running Trainer.train's argument (see
        # `_trainer_resume_arg` for why transformers gives no documented way), then the default folder name
        candidates = [self.resume_from, args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str)
                      else None, _trainer_resume_arg(), os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        for c in candidates:
            if c and os.path.isdir(c):
                return c
        return None

    def _resume(self, args: Any, state: Any, model: Any) -> None:
        assert self.masks is not None and self.algorithm is not None
        folder = self._resume_dir(args, state)
        if folder is None or not ckpt.has_state(folder):
            if self.on_missing_state == "from_weights" and not self.method_class.weight_masks:
                raise ckpt.MissingPruningStateError(
                    f"resuming method={self.method!r}: no pruning state in {folder or 'the checkpoint'}, and this "
                    "method's state (importance, removed units) cannot be read off the weights "
                    "(on_missing_state='from_weights' does not apply); resume from a checkpoint written with the "
                    "callback, or start a new run"
                )
            if self.on_missing_state == "from_weights":
                logger.warning("hf_prune: no pruning state to resume from; masks rebuilt from the zeros in the weights")
                self.masks.set_masks(self.masks.masks_from_weights())
                self.algorithm.target = self.masks.mask_sparsity()
                return
            ckpt.load_state(folder or f"<no checkpoint folder found for step {state.global_step}>")
        tensors, meta = ckpt.load_state(folder)  # type: ignore[arg-type]
        saved_world = meta.get("world_size")
        if saved_world is not None and int(saved_world) != world_size():
            if self.on_world_size_change == "error":
                raise UnsupportedTrainingSetupError(
                    f"resuming from {folder}: its pruning state was written by {saved_world} process(es), this run has "
                    f"{world_size()}. The masks and scores are stored whole, so they can be cut for the new processes: "
                    "pass PruningCallback(..., on_world_size_change='reshard') to continue (the data order, and so "
                    "the sparsity trajectory, then differs from an uninterrupted run), or resume with "
                    f"{saved_world} process(es)"
                )
            logger.warning("hf_prune: resuming state written by %s process(es) with %d", saved_world, world_size())
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
        self.algorithm.load_state(meta, tensors)
        self.last_update_step = meta.get("last_update_step")
        self.history = [list(h) for h in meta.get("history", [])]

    # ------------------------------------------------------------------ reporting
    def _report(self, model: Any, args: Any) -> PruningReport:
        assert self.masks is not None
        rows = [LayerRow(name, _block_index(name), shape, numel, nonzero, round(self.target, 6))
                for name, shape, numel, nonzero in self.masks.layer_stats()]
        params = sum(p.numel() for p in model.parameters()) if model is not None else sum(r.params for r in rows)
        device = str(next(model.parameters()).device) if model is not None else "cpu"
        return PruningReport(method=self.method, structure=self.config.structure, target_sparsity=self.target,
                             layers=rows, total_params=params, seconds=0.0, peak_rss_mb=lifetime_peak_rss_mb(),
                             device=device, config=self.config.to_dict(), kind="training",
                             history=[list(h) for h in self.history])

    def summary(self) -> str:
        """Per-layer table of the final masks (`hf_prune.report.PruningReport`, ``kind="training"``)."""
        report = self.report or self._report(None, None)
        return report.table()


def _block_index(name: str) -> int:
    """The first integer path component of a parameter name (its decoder block), or -1."""
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def _trainer_resume_arg() -> str | None:
    """The ``resume_from_checkpoint`` folder the running ``Trainer.train`` call received (read off the stack).

    A fallback, kept because transformers (checked with 5.24) offers no documented way for a callback to learn
    which checkpoint folder a run resumes from, and the masks, movement scores and rewind weights are tensors
    in that folder (``hf_prune_masks.safetensors``):

    * no callback event receives the folder: ``CallbackHandler.call_event`` passes ``model``,
      ``processing_class``, ``optimizer``, ``lr_scheduler`` and the dataloaders only, and
      ``Trainer.train(resume_from_checkpoint=...)`` does not write it into ``args.resume_from_checkpoint``;
    * ``ExportableState`` (``state.stateful_callbacks`` in ``trainer_state.json``) restores JSON, not tensors,
      and not the folder it was read from. Restoring it at all needs
      ``TrainingArguments(restore_callback_states_from_checkpoint=True)`` (default False), and then
      ``Trainer._load_callback_state`` *replaces* the user's callback by a new ``PruningCallback(**args)``
      instance, so the object the user holds (and its calibration data, tokenizer) would be dropped. A folder
      path stored there would also be stale once the checkpoint is copied or moved.

    So the documented routes come first in `PruningCallback._resume_dir` (``PruningCallback(resume_from=...)``,
    ``args.resume_from_checkpoint``); this one only reads the argument of a running `transformers.Trainer`
    method (``train`` or ``_inner_training_loop``, which hold the resolved folder, also for
    ``resume_from_checkpoint=True``); ``output_dir/checkpoint-<step>`` is the last resort.
    """
    from transformers import Trainer  # already imported: a Trainer is running

    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name in ("_inner_training_loop", "train") and isinstance(frame.f_locals.get("self"), Trainer):
                value = frame.f_locals.get("resume_from_checkpoint")
                if isinstance(value, str):
                    return value
            frame = frame.f_back
    finally:
        del frame
    return None


def _check_supported(args: Any, model: Any) -> None:
    """DDP and FSDP2 (DTensor parameters) are supported; FSDP1 (flattened parameters) and DeepSpeed are not."""
    if model is None:
        raise HfPruneError("PruningCallback needs the Trainer to pass the model to callbacks")
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"):
        raise UnsupportedTrainingSetupError(
            "PruningCallback does not support DeepSpeed: ZeRO partitions parameters and optimizer state into flat "
            "buffers the masks cannot follow. Use FSDP2 (TrainingArguments(fsdp='full_shard', fsdp_config={'version': "
            "2}), or torch's fully_shard), which shards whole parameters on dim 0, or DDP"
        )
    fsdp = getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    flat = any(type(p).__name__ == "FlatParameter" or getattr(p, "_fsdp_flattened", False)
               or "_fsdp_wrapped_module" in n for n, p in model.named_parameters())
    if flat or (fsdp and not any(is_dtensor(p) for p in model.parameters())):
        why = ("this model has FSDP1 flattened parameters, which per-weight masks cannot follow" if flat else
               "FSDP is on, but no parameter is a DTensor: FSDP1 (its parameters are not DTensors), or a model FSDP "
               "did not shard (accelerate applies FSDP on GPU-class devices only: on CPU the Trainer runs DDP "
               "instead, so drop fsdp= there)")
        raise UnsupportedTrainingSetupError(
            f"PruningCallback supports FSDP2 only, whose DTensor parameters are sharded on dim 0 and masked shard by "
            f"shard; {why}. Use FSDP2 (fsdp_config={{'version': 2}}, transformers' default, or torch's fully_shard), "
            "or DDP"
        )
