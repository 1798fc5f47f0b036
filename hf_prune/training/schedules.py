"""Sparsity schedules for pruning during training. Pure functions of the step: no state, no tensors.

Zhu & Gupta (2017) cubic schedule, with ``t0 = start``, ``n*dt = end - start`` and the step quantised to the
update grid (``update_every``)::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3

Example:
    >>> from hf_prune.training.schedules import target_sparsity
    >>> [round(target_sparsity(t, 0.8, start=0, end=100, schedule="cubic", update_every=50), 3) for t in (0, 49, 50, 100)]
    [0.0, 0.0, 0.7, 0.8]
    >>> target_sparsity(10, 0.5, start=20, end=40, schedule="linear")
    0.0
"""

from __future__ import annotations

from ..errors import ConfigError

SCHEDULES = ("constant", "linear", "cubic")


def check_schedule(schedule: str, start: int, end: int, update_every: int = 1) -> None:
    """Raise `ConfigError` for an unknown schedule, a schedule that ends before it starts, or a bad update period."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule={schedule!r} is unknown; allowed: {list(SCHEDULES)}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ConfigError(f"start_step={start!r} must be an integer >= 0")
    if isinstance(end, bool) or not isinstance(end, int):
        raise ConfigError(f"end_step={end!r} must be an integer")
    if end <= start:
        raise ConfigError(f"end_step={end} must be greater than start_step={start} (the schedule would end before it starts)")
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ConfigError(f"update_every={update_every!r} must be a positive integer (steps between mask updates)")


def quantized_step(step: int, start: int, update_every: int = 1) -> int:
    """The last update step at or before ``step`` (steps before ``start`` are returned unchanged)."""
    if step < start:
        return step
    return start + ((step - start) // update_every) * update_every


def schedule_progress(step: int, start: int, end: int, update_every: int = 1) -> float:
    """Fraction of the schedule done at ``step``, in [0, 1], on the update grid (1 from ``end`` on)."""
    if step >= end:
        return 1.0
    if step < start:
        return 0.0
    return (quantized_step(step, start, update_every) - start) / (end - start)


def target_sparsity(
    step: int,
    final: float,
    *,
    start: int = 0,
    end: int,
    schedule: str = "cubic",
    initial: float = 0.0,
    update_every: int = 1,
) -> float:
    """Target sparsity at optimizer step ``step`` (0 before ``start``, ``final`` from ``end`` on).

    ``constant`` jumps to ``final`` at ``start``; ``linear`` ramps from ``initial`` to ``final``; ``cubic`` is
    Zhu & Gupta's ``s_f + (s_i - s_f)(1 - p)^3`` (prunes fast early, slowly near the end).
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule={schedule!r} is unknown; allowed: {list(SCHEDULES)}")
    if step < start:
        return 0.0
    if schedule == "constant":
        return float(final)
    p = schedule_progress(step, start, end, update_every)
    if schedule == "linear":
        return float(initial + (final - initial) * p)
    return float(final + (initial - final) * (1.0 - p) ** 3)


def is_update_step(step: int, start: int, end: int, update_every: int = 1, after_end: bool = False) -> bool:
    """Whether masks are recomputed at ``step``: every ``update_every`` steps from ``start`` up to ``end``
    (``end`` itself always), and after ``end`` only if ``after_end`` (movement pruning keeps re-ranking)."""
    if step < start:
        return False
    if step == end:
        return True
    if step > end and not after_end:
        return False
    return (step - start) % update_every == 0


def lottery_round_steps(start: int, end: int, rounds: int) -> list[int]:
    """Steps at which lottery-ticket rounds prune: ``rounds`` evenly spaced steps ending at ``end``."""
    if rounds < 1:
        raise ConfigError(f"lottery_rounds={rounds!r} must be >= 1")
    steps = [start + round((end - start) * r / rounds) for r in range(1, rounds + 1)]
    if len(set(steps)) != len(steps) or steps[0] <= start:
        raise ConfigError(
            f"lottery_rounds={rounds} does not fit between start_step={start} and end_step={end}: "
            "each round needs at least one training step"
        )
    return steps


def lottery_sparsity(round_idx: int, rounds: int, final: float) -> float:
    """Sparsity after round ``round_idx`` (1-based) of iterative magnitude pruning: the same fraction of the
    surviving weights is removed every round, ``1 - (1 - s_f)^(r / R)``."""
    if round_idx <= 0:
        return 0.0
    return float(1.0 - (1.0 - final) ** (min(round_idx, rounds) / rounds))
