"""Options of the one-shot methods (declared once; the CLI and the docs read the ``help`` metadata).

Example:
    >>> from hf_prune.oneshot.options import SparseGPTOptions
    >>> SparseGPTOptions(blocksize=64).dampening
    0.01
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import (
    MethodOptions,
    PruningConfig,
    boolean,
    check_fraction,
    check_regex,
    fraction,
    non_negative_int,
    number_or_auto,
    option,
    positive,
    positive_int,
)
from ..errors import ConfigError

MAGNITUDE_GROUPS = ("layer", "row")


@dataclass
class RankGroupOptions(MethodOptions):
    """How magnitude ranks weights (one-shot magnitude and the training methods)."""

    magnitude_group: str = option("layer", "magnitude's comparison group: 'layer' (one threshold per matrix, the "
                                  "classic baseline) or 'row' (per output row, like Wanda)", choices=MAGNITUDE_GROUPS)


def _number_or_auto(value: Any) -> str | None:
    ok = value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool))
    return None if ok else "'auto' or a number"


def _positive_or_auto(value: Any) -> str | None:
    return None if value == "auto" or positive(value) is None else "'auto' or a number > 0"


def _sparsity_dict(value: Any) -> str | None:
    return None if isinstance(value, dict) else "a dict {regex: sparsity}"


@dataclass
class OneShotOptions(MethodOptions):
    """Per-layer sparsity of the one-shot methods (magnitude, wanda, sparsegpt, ria)."""

    layer_sparsity: dict[str, float] = option(
        help="per-layer overrides {regex: sparsity}; the first regex matching a module's full name wins "
             "(unstructured only)", default_factory=dict, check=_sparsity_dict)
    owl: bool = option(False, "OWL outlier-weighted non-uniform per-block sparsity (unstructured only)", check=boolean)
    owl_lambda: float | str = option(
        "auto", "OWL: largest deviation of a block's sparsity from the target, in (-1, 1) (negative: blocks with "
        "more outliers get *more* sparsity), or 'auto': chosen with the threshold by a search on the calibration "
        "loss that includes uniform sparsity, so it is never worse than uniform there (paper: 0.08)",
        check=_number_or_auto, parse=number_or_auto)
    owl_threshold: float | str = option(
        "auto", "OWL: a score is an outlier above this many times its block's mean score, or 'auto' (searched over "
        "3, 5, 10; paper: 5)", check=_positive_or_auto, parse=number_or_auto)
    owl_search_samples: int = option(8, "OWL search: calibration samples whose next-token loss ranks the "
                                     "candidate allocations", check=positive_int)
    owl_min_gain: float = option(
        0.01, "OWL search: a non-uniform allocation must lower the proxy's calibration loss by at least this "
        "fraction of uniform's loss, else uniform is kept (the proxy has no weight update; on SmolLM2 at 50% a 0.8% "
        "proxy gain became a 0.1% perplexity loss after ADMM's update). 0 takes any gain", check=fraction)

    def check_config(self, config: PruningConfig) -> None:
        for pattern, value in self.layer_sparsity.items():
            check_regex("layer_sparsity", pattern)
            check_fraction(f"layer_sparsity[{pattern!r}]", value)
        if self.owl_lambda != "auto" and not -1 < self.owl_lambda < 1:
            raise ConfigError(f"owl_lambda={self.owl_lambda!r} must be 'auto' or in (-1, 1) (paper: 0.08)")
        if config.nm is not None:
            if self.owl:
                raise ConfigError("owl=True needs structure='unstructured' (N:M fixes every layer's sparsity)")
            if self.layer_sparsity:
                raise ConfigError("layer_sparsity overrides need structure='unstructured' (N:M fixes sparsity)")
        sparsity = float(config.sparsity)  # type: ignore[arg-type]
        if self.owl and self.owl_lambda != "auto" and not (0 <= sparsity - abs(self.owl_lambda)
                                                           and sparsity + abs(self.owl_lambda) < 1):
            raise ConfigError(f"owl_lambda={self.owl_lambda} around sparsity={sparsity} leaves [0, 1); "
                              "lower |owl_lambda| or use owl_lambda='auto'")


@dataclass
class MagnitudeOptions(OneShotOptions, RankGroupOptions):
    """Options of ``magnitude``."""


@dataclass
class DampeningOptions(MethodOptions):
    """Dampening of the least-squares solves (SparseGPT, structured reconstruction)."""

    dampening: float = option(0.01, "relative dampening of the least-squares solves, a fraction of the mean "
                              "Hessian diagonal", check=positive)
    max_damp_retries: int = option(3, "retries of a failed Cholesky, each with 10x the dampening",
                                   check=non_negative_int)


@dataclass
class SparseGPTOptions(OneShotOptions, DampeningOptions):
    """SparseGPT's column-by-column reconstruction."""

    blocksize: int = option(128, "SparseGPT: columns updated together (lazy batch size)", check=positive_int)
