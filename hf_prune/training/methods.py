"""Training-time pruning methods: objects with a small interface that `PruningCallback` drives.

`TrainingMethod` is the interface. One object is built per ``Trainer.train()`` call, over the run's
`MaskState`; the callback only calls:

* `check` (schedule against the Trainer's ``max_steps``) and `begin` (fresh start: starting masks);
* `update` at the end of every optimizer step (``True`` when the masks were recomputed);
* `before_optimizer_step` (after the gradients are final, before they are masked);
* `log_values`, and `state` / `state_tensors` / `load_state` for checkpoints.

``needs_dense_grad`` says whether masked gradients must stay dense through backward (movement scores).

The registered classes (``gmp``, ``movement``, ``soft_movement``, ``lottery``; ``loraprune`` in
`hf_prune.training.loraprune`) are `TrainingOnlyMethod`s:
built from a config alone, as `hf_prune.prune` builds one-shot methods, they raise `ConfigError` before the
model is touched. One-shot methods (``magnitude``, ``wanda``, ``sparsegpt``) run in training as `ConstantMask`.

Example:
    >>> import hf_prune
    >>> from hf_prune.training.methods import ConstantMask, GradualMagnitudePruning, training_method_class
    >>> training_method_class("gmp") is GradualMagnitudePruning, training_method_class("wanda") is ConstantMask
    (True, True)
    >>> GradualMagnitudePruning.needs_dense_grad, training_method_class("movement").needs_dense_grad
    (False, True)
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch

from ..config import PruningConfig
from ..errors import CalibrationError, ConfigError, HfPruneError
from ..oneshot.base import PruningMethod
from ..oneshot.functional import magnitude_scores
from ..registry import get_spec, register_method
from .lottery import RewindSnapshot
from .movement import MovementScores, soft_mask, soft_threshold
from .options import LotteryOptions, MovementOptions, ScheduleOptions, SoftMovementOptions
from .schedules import (
    check_schedule,
    is_update_step,
    lottery_round_steps,
    lottery_sparsity,
    schedule_progress,
    target_sparsity,
)
from .state import MaskState, layer_view

logger = logging.getLogger("hf_prune")

LOG_THRESHOLD = "prune/threshold"


def _magnitude(entry: Any, layer: Any, weight: torch.Tensor) -> torch.Tensor:
    return magnitude_scores(weight).float()


class TrainingMethod:
    """How the masks of one training run evolve. Subclasses implement `new_masks` and the hooks they need.

    Args:
        config: the run's `PruningConfig`.
        masks: the run's `MaskState` (masks and their enforcement; shared with the callback).
        end_step: the step at which the final sparsity is reached (``config.end_step`` or the Trainer's
            ``max_steps``).
    """

    #: masked gradients must stay dense through backward (no gradient hooks; masked before the optimizer step)
    needs_dense_grad: ClassVar[bool] = False
    #: the method prunes through per-weight masks (`MaskState`); ``False``: it keeps none (nothing is allocated,
    #: enforced or checkpointed there)
    weight_masks: ClassVar[bool] = True

    def __init__(self, config: PruningConfig, masks: MaskState, end_step: int) -> None:
        self.config = config
        self.masks = masks
        self.end_step = end_step
        self.target = 0.0  # scheduled sparsity of the current masks

    # ------------------------------------------------------------------ lifecycle
    def check(self, max_steps: int) -> None:
        """Check the schedule against the Trainer (raise `ConfigError`, or warn)."""
        cfg = self.config
        if self.end_step > max_steps > 0:
            logger.warning("hf_prune: end_step=%d is after the Trainer's max_steps=%d: training stops before the final "
                           "sparsity %.3g is reached", self.end_step, max_steps, cfg.sparsity)
        try:
            check_schedule(cfg.schedule, cfg.start_step, self.end_step, cfg.update_every)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (end_step defaults to the Trainer's max_steps={max_steps})") from None

    @classmethod
    def on_trainer_init(cls, model: Any, config: PruningConfig) -> None:
        """The Trainer is being built (before its optimizer exists): methods that add trainable modules add them
        here, so the optimizer includes them."""

    def set_trainer(self, args: Any, optimizer: Any) -> None:
        """The Trainer's ``TrainingArguments`` and optimizer, before `attach`."""

    def attach(self, model: Any) -> None:
        """The run's model, before `begin` (fresh run) or `load_state` (resumed): methods that need more than the
        weight masks (hooks, adapters) set up here; raise `ConfigError` before anything is changed."""

    def begin(self, model: Any, calibration: Any = None, tokenizer: Any = None) -> bool:
        """A fresh (not resumed) run starts; return ``True`` if the starting masks were set here."""
        return False

    def detach(self) -> None:
        """Undo what `attach` installed (hooks) without finishing: a new run starts with this callback."""

    def end(self, model: Any) -> Any:
        """Training ended (weights masked a last time). A method that changes the model's shape returns its
        report (`hf_prune.report.Report`); ``None``: the callback reports the weight masks."""
        return None

    def achieved(self) -> float | None:
        """What the method has pruned so far, for logs and history, if not the weight masks' sparsity."""
        return None

    def before_optimizer_step(self) -> None:
        """The gradients are final (all-reduced, clipped) and not masked yet."""

    def update(self, step: int, optimizer: Any) -> bool:
        """End of optimizer step ``step``: recompute and install the masks if it is an update step. Returns
        whether it was (the masks may still be unchanged)."""
        new = self.new_masks(step)
        if new is None:
            return False
        new = self.masks.broadcast(new)  # DDP: every rank installs rank 0's masks (FSDP2: each its own rows)
        self.before_install(new)
        changed = self.masks.set_masks(new)
        self.after_install(step, changed, optimizer)
        self.masks.apply_()
        return True

    # ------------------------------------------------------------------ what subclasses define
    def new_masks(self, step: int) -> dict[str, torch.Tensor] | None:
        """The masks at update step ``step`` (and `target` set to their sparsity); ``None``: not an update step."""
        raise NotImplementedError

    def before_install(self, new: dict[str, torch.Tensor]) -> None:
        """Called with the new masks before they replace the current ones."""

    def after_install(self, step: int, changed: list[str], optimizer: Any) -> None:
        """The new masks are installed; ``changed`` names the parameters whose mask changed."""
        if changed:
            self.masks.mask_optimizer_state_(optimizer, changed)

    # ------------------------------------------------------------------ logging and checkpoints
    def log_values(self) -> dict[str, float]:
        """Extra values for the Trainer's logs."""
        return {}

    def state(self) -> dict[str, Any]:
        """JSON-able state saved in checkpoints (``hf_prune_state.json``)."""
        return {"target_sparsity": self.target}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved in checkpoints (``hf_prune_masks.safetensors``), beside the masks."""
        return {}

    def load_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `state` and `state_tensors` saved (the masks are already installed)."""
        self.target = float(meta.get("target_sparsity", 0.0))


class ConstantMask(TrainingMethod):
    """A one-shot method (``magnitude``, ``wanda``, ``sparsegpt``) as a training method: its mask is computed
    once when training starts (or read off a model already pruned by `hf_prune.prune`), then kept."""

    def check(self, max_steps: int) -> None:
        pass  # no schedule

    def begin(self, model: Any, calibration: Any = None, tokenizer: Any = None) -> bool:
        # hf_prune.prune: the one-shot pipeline with its calibration handling (tokenizer, vocabulary checks)
        from ..api import prune

        cfg = self.config
        needs_calib = get_spec(cfg.method).implementation.needs_calibration or cfg.owl
        already = bool(getattr(getattr(model, "config", None), "pruning_config", None))
        if calibration is not None or (not needs_calib and not already):
            prune(model, cfg, calibration, tokenizer, verbose=False, show_progress=False)
        elif not already:
            raise CalibrationError(
                f"PruningCallback(method={cfg.method!r}) needs calibration= (text, dataset or token ids) to compute "
                "the starting mask, or a model already pruned with hf_prune.prune"
            )
        self.masks.set_masks(self.masks.broadcast(self.masks.masks_from_weights()))
        self.target = float(cfg.sparsity)  # type: ignore[arg-type]
        return True

    def new_masks(self, step: int) -> dict[str, torch.Tensor] | None:
        return None


class TrainingOnlyMethod(TrainingMethod, PruningMethod):
    """Base of the registered methods that need training steps (gradients, weight updates) between mask
    updates. Built from a config alone (as `hf_prune.prune` builds one-shot methods) it raises `ConfigError`."""

    training_only: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    #: scheduled methods keep re-ranking after ``end_step`` (at the final sparsity)
    after_end: ClassVar[bool] = False

    def __init__(self, config: PruningConfig, masks: MaskState | None = None, end_step: int | None = None) -> None:
        if masks is None or end_step is None:
            raise ConfigError(
                f"method={config.method!r} prunes during training and cannot run one-shot in hf_prune.prune(); use "
                f"Trainer(..., callbacks=[hf_prune.PruningCallback(PruningConfig(method={config.method!r}, ...))]), "
                "or pick a one-shot method ('magnitude', 'wanda', 'sparsegpt')"
            )
        super().__init__(config, masks, end_step)

    def scheduled_target(self, step: int) -> float | None:
        """Target sparsity at ``step`` if it is an update step, else ``None``."""
        cfg = self.config
        if not is_update_step(step, cfg.start_step, self.end_step, cfg.update_every, after_end=self.after_end):
            return None
        return target_sparsity(step, float(cfg.sparsity), start=cfg.start_step, end=self.end_step,
                               schedule=cfg.schedule, initial=cfg.initial_sparsity, update_every=cfg.update_every)


@register_method("gmp", options=ScheduleOptions)
class GradualMagnitudePruning(TrainingOnlyMethod):
    """Zhu & Gupta gradual magnitude pruning: |W| re-ranked every ``update_every`` steps along the schedule."""

    def new_masks(self, step: int) -> dict[str, torch.Tensor] | None:
        target = self.scheduled_target(step)
        if target is None:
            return None
        self.target = target
        return self.masks.compute(_magnitude, target)


@register_method("movement", options=MovementOptions)
class MovementPruning(TrainingOnlyMethod):
    """Sanh et al. hard movement pruning: top-k of scores S learned with a straight-through estimator."""

    needs_dense_grad: ClassVar[bool] = True
    after_end: ClassVar[bool] = True

    def __init__(self, config: PruningConfig, masks: MaskState | None = None, end_step: int | None = None) -> None:
        super().__init__(config, masks, end_step)
        self.scores = MovementScores(self.masks.params)

    def l1(self) -> float:
        return 0.0

    def before_optimizer_step(self) -> None:
        self.scores.step(self.masks.params, self.config.movement_lr, self.l1())

    def top_scores(self, target: float) -> dict[str, torch.Tensor]:
        scores = self.scores.scores
        return self.masks.compute(lambda e, layer, w: layer_view(layer, scores[e.name]), target)

    def new_masks(self, step: int) -> dict[str, torch.Tensor] | None:
        target = self.scheduled_target(step)
        if target is None:
            return None
        self.target = target
        return self.top_scores(target)

    def before_install(self, new: dict[str, torch.Tensor]) -> None:
        for name, entry in self.masks.params.items():
            self.scores.on_mask_change(entry, new[name].to(entry.param.device))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"score/{n}": s for n, s in self.scores.scores.items()}
        out.update({f"frozen/{n}": s for n, s in self.scores.frozen.items()})
        return out

    def load_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().load_state(meta, tensors)
        for n, entry in self.masks.params.items():
            self.scores.scores[n] = self.masks.local_part(n, tensors[f"score/{n}"]).to(entry.values.device, torch.float32)
            self.scores.frozen[n] = self.masks.local_part(n, tensors[f"frozen/{n}"]).to(entry.values.device,
                                                                                       entry.values.dtype)


@register_method("soft_movement", options=SoftMovementOptions)
class SoftMovementPruning(MovementPruning):
    """Soft movement pruning: keep sigmoid(S) > tau, with an L1 penalty on sigmoid(S). With N:M structure the
    top-N scores of each group are kept (as hard movement)."""

    def __init__(self, config: PruningConfig, masks: MaskState | None = None, end_step: int | None = None) -> None:
        super().__init__(config, masks, end_step)
        self.threshold = 0.0

    def l1(self) -> float:
        return float(self.config.movement_l1)

    def new_masks(self, step: int) -> dict[str, torch.Tensor] | None:
        cfg = self.config
        if cfg.nm is not None:
            return super().new_masks(step)
        target = self.scheduled_target(step)
        if target is None:
            return None
        self.target = target
        progress = 1.0 if cfg.schedule == "constant" else schedule_progress(
            step, cfg.start_step, self.end_step, cfg.update_every)
        self.threshold = soft_threshold(progress, cfg.movement_threshold)
        cap = self.top_scores(target)  # the scheduled sparsity is a cap: the top (1 - target) scores are kept
        return {n: soft_mask(s, self.threshold) | cap[n] for n, s in self.scores.scores.items()}

    def log_values(self) -> dict[str, float]:
        return {LOG_THRESHOLD: round(self.threshold, 6)}

    def state(self) -> dict[str, Any]:
        return {**super().state(), "threshold": self.threshold}

    def load_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().load_state(meta, tensors)
        self.threshold = float(meta.get("threshold", 0.0))


@register_method("lottery", options=LotteryOptions)
class LotteryTicketPruning(TrainingOnlyMethod):
    """Iterative magnitude pruning with rewinding of the survivors to an early step (Frankle et al.)."""

    def __init__(self, config: PruningConfig, masks: MaskState | None = None, end_step: int | None = None) -> None:
        super().__init__(config, masks, end_step)
        self.rewind = RewindSnapshot()
        self.lottery_round = 0
        self.round_steps: list[int] = []

    def check(self, max_steps: int) -> None:
        super().check(max_steps)
        self.round_steps = lottery_round_steps(self.config.start_step, self.end_step, self.config.lottery_rounds)

    def update(self, step: int, optimizer: Any) -> bool:
        if not self.rewind.taken and step == self.config.lottery_rewind_step:
            self.rewind.take(self.masks.params, step)
        return super().update(step, optimizer)

    def new_masks(self, step: int) -> dict[str, torch.Tensor] | None:
        if step not in self.round_steps:
            return None
        cfg = self.config
        self.lottery_round = self.round_steps.index(step) + 1
        self.target = lottery_sparsity(self.lottery_round, cfg.lottery_rounds, float(cfg.sparsity))
        return self.masks.compute(_magnitude, self.target)

    def after_install(self, step: int, changed: list[str], optimizer: Any) -> None:
        if not self.rewind.taken:
            raise HfPruneError(f"lottery round at step {step} but no rewind snapshot (rewind step "
                               f"{self.config.lottery_rewind_step} was never reached)")
        self.rewind.rewind_(self.masks.params)
        self.masks.mask_optimizer_state_(optimizer, reset=True)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "lottery_round": self.lottery_round, "rewind_step": self.rewind.step}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"rewind/{n}": s for n, s in self.rewind.tensors.items()} if self.rewind.taken else {}

    def load_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().load_state(meta, tensors)
        self.lottery_round = int(meta.get("lottery_round", 0))
        if meta.get("rewind_step") is not None:
            self.rewind.step = int(meta["rewind_step"])
            self.rewind.tensors = {n: self.masks.local_part(n, tensors[f"rewind/{n}"]).to(e.values.device,
                                                                                         e.values.dtype)
                                   for n, e in self.masks.params.items()}


def training_method_class(name: str) -> type[TrainingMethod]:
    """The `TrainingMethod` that runs method ``name`` inside `PruningCallback` (from the registry: training
    methods are their own class, one-shot methods run as a `ConstantMask`)."""
    spec = get_spec(name)
    if spec.family == "training":
        return spec.implementation
    if spec.family == "oneshot":
        return ConstantMask
    raise ConfigError(
        f"method={name!r} is a structured method (it removes channels, heads or blocks), which PruningCallback cannot "
        "run during training; prune with hf_prune.prune before training, or pick a training method"
    )
