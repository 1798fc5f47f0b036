"""Options of the training-time methods (declared once; the CLI and the docs read the ``help`` metadata).

Example:
    >>> from hf_prune.training.options import ScheduleOptions
    >>> ScheduleOptions(schedule="linear", end_step=100).update_every
    10
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import (
    MethodOptions,
    PruningConfig,
    check_fraction,
    non_negative,
    non_negative_int,
    option,
    positive_int,
)
from ..errors import ConfigError
from ..oneshot.options import RankGroupOptions
from ..structure.options import WidthUnitOptions
from .schedules import SCHEDULES, check_schedule


def _unit_interval(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
    return None if ok else "a number in [0, 1)"


def _optional_step(value: Any) -> str | None:
    return None if value is None else non_negative_int(value)


@dataclass
class Schedule(MethodOptions):
    """When masks are updated and how the target sparsity grows (every training method)."""

    schedule: str = option("cubic", "how the target sparsity grows: 'constant', 'linear' or 'cubic' (Zhu & Gupta)",
                           choices=tuple(SCHEDULES))
    start_step: int = option(0, "optimizer step at which pruning starts", check=non_negative_int)
    end_step: int | None = option(None, "optimizer step at which the final sparsity is reached (None: the "
                                  "Trainer's max_steps)", check=_optional_step)
    update_every: int = option(10, "steps between mask updates (Zhu & Gupta's delta t)", check=positive_int)
    initial_sparsity: float = option(0.0, "sparsity at start_step (linear/cubic), at most sparsity")

    def check_config(self, config: PruningConfig) -> None:
        if self.end_step is not None:
            check_schedule(self.schedule, self.start_step, self.end_step, self.update_every)
        check_fraction("initial_sparsity", self.initial_sparsity)
        if self.initial_sparsity > float(config.sparsity):  # type: ignore[arg-type]
            raise ConfigError(f"initial_sparsity={self.initial_sparsity} is above the final sparsity="
                              f"{config.sparsity}; the schedule only ever increases sparsity")


@dataclass
class ScheduleOptions(Schedule, RankGroupOptions):
    """The schedule of the weight-level training methods, and how magnitude ranks weights."""


@dataclass
class LoraPruneOptions(Schedule, WidthUnitOptions):
    """LoRAPrune: heads and MLP channels ranked by LoRA-estimated importance during LoRA training."""

    loraprune_beta: float = option(0.9, "LoRAPrune: weight of the moving average, X <- beta * X + (1 - beta) * "
                                   "X_step (X: what loraprune_average names)", check=_unit_interval)
    loraprune_average: str = option(
        "importance", "LoRAPrune: what the moving average runs over. 'importance': each step's group scores (the "
        "paper's sum|G_hat * W'|, or the Fisher); 'gradient' (loraprune_importance='lora' only): the LoRA gradients "
        "G_A, G_B (an fp32 copy of the adapters' size), with G_hat and the importance formed from the averages at "
        "each mask update, like one-shot Taylor's accumulated gradient (cheaper per step)",
        choices=("importance", "gradient"))
    loraprune_importance: str = option(
        "fisher", "LoRAPrune: what ranks the units. 'fisher' (default): the empirical Fisher of each unit's output "
        "gate, sum over sequences of (sum over tokens of x * dL/dx)^2 at the o_proj / down_proj inputs (Kwon et al., "
        "2022), a second-order estimate of the loss increase when the unit is removed, from activation gradients the "
        "LoRA backward pass computes anyway (no base-weight gradient, no [out, in] matrix); 'lora': the paper's "
        "|G_hat * W'| from the LoRA gradients alone (measured on SmolLM2: it ranks units less like true Taylor "
        "importance and prunes worse, benchmarks/README.md)", choices=("fisher", "lora"))

    def check_config(self, config: PruningConfig) -> None:
        super().check_config(config)
        if config.structure != "unstructured":
            raise ConfigError(f"method='loraprune' removes heads and MLP channels (structured); structure="
                              f"{config.structure!r} does not apply, leave it 'unstructured'")
        if config.loraprune_importance == "fisher" and config.loraprune_average != "importance":
            raise ConfigError(f"loraprune_average={config.loraprune_average!r} averages LoRA gradients, which only "
                              "loraprune_importance='lora' (the paper's estimate) uses, and loraprune_importance is "
                              "'fisher' (the default): set loraprune_importance='lora', or leave "
                              "loraprune_average='importance' (the Fisher scores are averaged)")


@dataclass
class MovementOptions(ScheduleOptions):
    """Movement pruning's learned scores S."""

    movement_lr: float = option(1.0, "step size of the movement scores S (S -= lr * dL/dW' * W)", check=non_negative)


def _open_unit(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1
    return None if ok else "in (0, 1) (a threshold on sigmoid(S))"


@dataclass
class SoftMovementOptions(MovementOptions):
    """Soft movement pruning: a threshold on sigmoid(S) and an L1 penalty."""

    movement_l1: float = option(1e-4, "soft movement: L1 penalty coefficient on sigmoid(S)", check=non_negative)
    movement_threshold: float = option(0.5, "soft movement keeps sigmoid(S) > tau; tau follows the schedule from 0 "
                                       "to this value (sparsity is a cap)", check=_open_unit)


@dataclass
class LotteryOptions(ScheduleOptions):
    """Iterative magnitude pruning with rewinding (lottery tickets)."""

    lottery_rounds: int = option(3, "lottery-ticket rounds between start_step and end_step", check=positive_int)
    lottery_rewind_step: int = option(0, "step whose weights the survivors are rewound to (at most start_step)",
                                      check=non_negative_int)

    def check_config(self, config: PruningConfig) -> None:
        super().check_config(config)
        if self.lottery_rewind_step > self.start_step:
            raise ConfigError(
                f"lottery_rewind_step={self.lottery_rewind_step} must be <= start_step={self.start_step}: survivors "
                "are rewound to weights saved before the first round prunes"
            )


def _open_fraction(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
    return None if ok else "a number in (0, 1]"


def _flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else "True or False"


@dataclass
class PatOptions(MethodOptions):
    """Pruning-aware tuning: hidden dimensions learned through a shared mask in Hybrid Sparsification Modules."""

    pat_rank: int = option(8, "PAT: rank of each Hybrid Sparsification Module's low-rank adapter (the paper: 20)",
                           check=positive_int)
    pat_multiple: int = option(8, "PAT: the kept hidden size is rounded to a multiple of this", check=positive_int)
    pat_freeze: float = option(0.8, "PAT: fraction of the training steps after which the mask is made hard (exactly "
                               "the kept dimensions) and frozen; the rest of training adapts to it",
                               check=_open_fraction)
    pat_warmup: float = option(0.05, "PAT: fraction of the training steps at the start during which the mask is 1 and "
                               "the residual stream's energy per hidden dimension is measured; the mask logits then "
                               "start from it (0: logits start at 0, as in the paper)", check=_unit_interval)
    pat_mask_lr: float = option(0.02, "PAT: Adam step size of the mask logits m, which have their own optimizer "
                                "(their gradient: the task loss, plus the mask loss for pat_mask_rule='count_loss')",
                                check=non_negative)
    pat_mask_rule: str = option("topk", "PAT: how the kept count is reached: 'topk' (the soft mask is centred on the "
                                "top-K threshold of the logits, scaled by their local spread, so K dimensions lead at every step and T "
                                "alone sharpens it; no mask loss) or 'count_loss' (the paper: sigmoid(T m) with a "
                                "straight-through count loss and polarisation)", choices=("topk", "count_loss"))
    pat_mask_weight: float = option(1.0, "PAT: weight of the mask loss (kept-dimension count and polarisation; "
                                    "pat_mask_rule='count_loss' only: the top-K rule needs none)",
                                    check=non_negative)
    pat_identity_weight: float = option(1.0, "PAT: weight of the identity loss MSE(A A^T, I) on the HSM adapters",
                                        check=non_negative)
    pat_train_base: bool = option(False, "PAT: also train the base weights of a plain (non-peft) model; by default "
                                  "they are frozen and only the HSMs train, as in the paper", check=_flag)
    pat_compensate: bool = option(True, "PAT: when the mask is frozen, let every reader (q/k/v, gate/up) see its "
                                  "input's dropped dimensions predicted from the kept ones by least squares on the "
                                  "warm-up's statistics, instead of 0; folded into the readers' weights at the end, "
                                  "so the saved model is unchanged in shape. Needs pat_warmup > 0 (else skipped with a "
                                  "warning)", check=_flag)
    pat_distill: float = option(0.0, "PAT: weight of a distillation loss, the per-token KL(teacher || student) of the "
                                "next-token distributions, added to the task loss. The teacher is the model PAT started "
                                "from (every HSM bypassed, LoRA adapters off), run without gradients on the same batch, "
                                "so no second copy of the weights is held; it costs one more forward pass per step. "
                                "Needs frozen base weights (pat_train_base=False). 0: off, as in the paper",
                                check=non_negative)
    pat_untie: bool = option(False, "PAT: give the embeddings a full HSM (with a low-rank adapter) and untie "
                             "lm_head from them; by default tied embeddings get a diagonal HSM and stay tied",
                             check=_flag)

    def check_config(self, config: PruningConfig) -> None:
        if config.structure != "unstructured":
            raise ConfigError(f"method='pat' removes hidden dimensions; structure={config.structure!r} does not "
                              "apply, leave it 'unstructured'")
        if float(config.pat_distill or 0) > 0 and config.pat_train_base:  # type: ignore[arg-type]
            raise ConfigError("pat_distill > 0 distils from the model PAT started from, which exists only while the base "
                              "weights stay frozen; set pat_train_base=False (train LoRA adapters instead) or "
                              "pat_distill=0")
        if not float(config.sparsity or 0) > 0:  # type: ignore[arg-type]
            raise ConfigError("method='pat' needs sparsity > 0: the fraction of hidden dimensions to remove "
                              "(e.g. 0.25: 576 -> 432 on SmolLM2)")
