"""`PruningConfig`: one validated, JSON-serialisable description of a pruning job.

Example:
    >>> from hf_prune import PruningConfig
    >>> cfg = PruningConfig(method="wanda", sparsity=0.5, structure="2:4")
    >>> cfg.nm
    (2, 4)
    >>> PruningConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

#: Module-name patterns (regular expressions, `re.search`) never pruned by default.
DEFAULT_IGNORE: tuple[str, ...] = (
    r"(^|\.)lm_head$",
    r"embed",
    r"(^|\.)(wte|wpe)$",
    r"(^|\.)score$",
    r"(^|\.)(router|gate)$",  # MoE routers (Mixtral/Qwen-MoE "mlp.gate"); never "gate_proj"
    r"shared_expert_gate$",
)

MAGNITUDE_GROUPS = ("layer", "row")
#: ``structure`` values of structured methods (`hf_prune.structure`): what a method physically removes.
STRUCTURED_KINDS = ("width", "depth", "sublayer")
WIDTH_UNITS = ("both", "mlp", "heads")
ALLOCATIONS = ("global", "uniform")
GQA_MODES = ("query", "group")
TAYLOR_VARIANTS = ("element", "vector")
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_structure(structure: str) -> tuple[int, int] | None:
    """Return ``(n, m)`` for an ``"N:M"`` string, ``None`` for ``"unstructured"``.

    Raises `ConfigError` for anything else, or for N >= M.
    """
    if not isinstance(structure, str):
        raise ConfigError(f"structure must be a string ('unstructured' or 'N:M', e.g. '2:4'), got {structure!r}")
    if structure.strip().lower() == "unstructured" or structure in STRUCTURED_KINDS:
        return None
    match = _NM_RE.match(structure)
    if not match:
        raise ConfigError(
            f"structure={structure!r} is not understood; allowed: 'unstructured' or 'N:M' with integers "
            f"0 < N < M (e.g. '2:4', '4:8'), or for structured methods one of {list(STRUCTURED_KINDS)}"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ConfigError(f"structure={structure!r}: N:M needs 0 < N < M (keep N of every M weights), got N={n}, M={m}")
    return n, m


@dataclass
class PruningConfig:
    """What to prune, how much, and with which calibration.

    Args:
        method: registered method name (``"magnitude"``, ``"wanda"``, ``"sparsegpt"``; see
            `hf_prune.available_methods()`).
        sparsity: fraction of weights set to zero in each targeted layer, in [0, 1). For N:M structures it
            may be omitted (it is ``1 - N/M``); if given it must equal ``1 - N/M``.
        structure: ``"unstructured"`` or ``"N:M"`` (keep N of every M consecutive input weights per row).
        targets: regexes (``re.search`` on the full module name) selecting modules to prune. ``None`` means
            every linear layer (and fused MoE expert tensor) inside the repeated decoder blocks.
        ignore: regexes of modules never pruned (default: lm_head, embeddings, classification heads).
        magnitude_group: comparison group for magnitude: ``"layer"`` (one threshold per matrix, the
            classic baseline) or ``"row"`` (per output row, like Wanda).
        num_calibration_samples: number of calibration sequences.
        seqlen: tokens per calibration sequence.
        batch_size: calibration sequences per forward pass through a block.
        seed: seed for sampling calibration windows.
        blocksize: SparseGPT column block size.
        dampening: SparseGPT relative dampening (fraction of the mean Hessian diagonal).
        max_damp_retries: how often SparseGPT retries a failed Cholesky with 10x more dampening.
        layer_sparsity: per-layer overrides ``{regex: sparsity}``; the first regex that matches a module's full
            name wins (unstructured only).
        owl: use OWL outlier-weighted non-uniform per-block sparsity (unstructured only).
        owl_lambda: OWL's maximum deviation of a block's sparsity from the target.
        owl_threshold: OWL's outlier threshold M (a score is an outlier if > M x the layer's mean score).
        restore_on_error: keep a CPU copy of each block's original weights so that a failure half-way
            restores the model. Turn off for models that do not fit twice in CPU memory; a failed run
            then marks the model as incomplete and `save_pretrained` refuses it.

    Structured pruning (methods ``"flap"``, ``"wanda-sp"``, ``"taylor"`` remove MLP channels and attention
    heads; ``"block-influence"``, ``"angular"`` remove whole blocks; ``"finercut"`` removes attention/MLP
    sublayers). For these, ``sparsity`` is the fraction of decoder-block *parameters* removed, and
    ``structure`` is the method's kind (``"width"``, ``"depth"`` or ``"sublayer"``; filled in when omitted).

    Args:
        width_units: what width methods remove: ``"both"`` (MLP channels and heads), ``"mlp"`` or ``"heads"``.
        allocation: ``"global"`` (one standardized threshold across layers, FLAP style: layers lose different
            amounts) or ``"uniform"`` (every layer loses the same fraction).
        gqa_mode: ``"query"`` removes the same number of query heads from every key/value group of a layer;
            ``"group"`` removes whole key/value groups (a kv head and all its query heads).
        bias_compensation: FLAP's bias compensation (the mean contribution of removed channels is added to the
            output projection's bias); used by ``"flap"`` and ``"wanda-sp"``.
        round_to: keep a multiple of this many MLP channels per layer (e.g. 8 or 32 for faster kernels).
        angular_last_token: ``"angular"`` measures distances on each sequence's last token (the paper's
            choice) instead of all tokens.
        taylor_variant: ``"taylor"`` importance: ``"element"`` (sum of |w * g|, LLM-Pruner's best) or ``"vector"``
            (|sum of w * g| over the group).
        finercut_tokens: calibration tokens ``"finercut"`` uses to compare each candidate removal with the dense
            model (its greedy search runs many forwards, so it uses fewer tokens than the other methods).
        reconstruct: after choosing what to remove, refit the output projections (o_proj / down_proj) by least
            squares, with an intercept that replaces bias compensation: block by block, each pruned projection
            is fit on the inputs the *pruned* model gives it to reproduce the *dense* model's output, so earlier
            pruning error is corrected. No gradient steps. Width methods only; costs about 4x the scoring pass.

    Pruning during training (`hf_prune.PruningCallback`; ignored by one-shot `prune`):

    Args:
        schedule: how the target sparsity grows: ``"constant"``, ``"linear"`` or ``"cubic"`` (Zhu & Gupta).
        start_step: optimizer step at which pruning starts.
        end_step: optimizer step at which the final ``sparsity`` is reached (``None``: the Trainer's
            ``max_steps``).
        update_every: steps between mask updates (Zhu & Gupta's delta t).
        initial_sparsity: sparsity at ``start_step`` (``linear``/``cubic``), at most ``sparsity``.
        movement_threshold: soft movement pruning keeps weights with ``sigmoid(S) > tau``; ``tau`` follows
            the schedule's progress from 0 to this value (the scheduled ``sparsity`` is a cap: the top
            ``1 - sparsity`` scores are always kept).
        movement_l1: soft movement pruning's L1 penalty coefficient on ``sigmoid(S)``.
        movement_lr: step size of the movement scores ``S`` (``S -= lr * (dL/dW' * W + l1 * sigmoid'(S))``).
        lottery_rounds: lottery-ticket rounds of iterative magnitude pruning between start and end step.
        lottery_rewind_step: step whose weights the survivors are rewound to after each round
            (at most ``start_step``).
    """

    method: str = "wanda"
    sparsity: float | None = 0.5
    structure: str = "unstructured"
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))
    magnitude_group: str = "layer"
    num_calibration_samples: int = 128
    seqlen: int = 512
    batch_size: int = 8
    seed: int = 0
    blocksize: int = 128
    dampening: float = 0.01
    max_damp_retries: int = 3
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    owl: bool = False
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0
    restore_on_error: bool = True
    # --- structured pruning (hf_prune.structure) ---
    width_units: str = "both"
    allocation: str = "global"
    gqa_mode: str = "query"
    bias_compensation: bool = True
    round_to: int = 1
    angular_last_token: bool = True
    taylor_variant: str = "element"
    finercut_tokens: int = 2048
    reconstruct: bool = False
    # --- pruning during training (hf_prune.training) ---
    schedule: str = "cubic"
    start_step: int = 0
    end_step: int | None = None
    update_every: int = 10
    initial_sparsity: float = 0.0
    movement_threshold: float = 0.5
    movement_l1: float = 1e-4
    movement_lr: float = 1.0
    lottery_rounds: int = 3
    lottery_rewind_step: int = 0

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field; raise `ConfigError` naming the field and what is allowed."""
        from .registry import available_methods

        if not isinstance(self.method, str) or self.method not in available_methods():
            close = difflib.get_close_matches(str(self.method), available_methods(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"method={self.method!r} is unknown; allowed: {sorted(available_methods())}.{hint}")
        self._validate_structured()
        nm = parse_structure(self.structure)
        if nm is not None:
            n, m = nm
            implied = 1.0 - n / m
            if self.sparsity is None:
                self.sparsity = implied
            elif not math.isclose(float(self.sparsity), implied, abs_tol=1e-9):
                raise ConfigError(
                    f"sparsity={self.sparsity} contradicts structure={self.structure!r}, which always gives "
                    f"sparsity {implied:g}; pass sparsity={implied:g} or leave sparsity unset"
                )
            if self.owl:
                raise ConfigError("owl=True needs structure='unstructured' (N:M fixes every layer's sparsity)")
            if self.layer_sparsity:
                raise ConfigError("layer_sparsity overrides need structure='unstructured' (N:M fixes sparsity)")
        if self.sparsity is None:
            raise ConfigError("sparsity is required for structure='unstructured': a float in [0, 1), e.g. 0.5")
        _check_fraction("sparsity", self.sparsity)
        self.sparsity = float(self.sparsity)
        if self.magnitude_group not in MAGNITUDE_GROUPS:
            raise ConfigError(f"magnitude_group={self.magnitude_group!r}; allowed: {list(MAGNITUDE_GROUPS)}")
        for name in ("num_calibration_samples", "seqlen", "batch_size", "blocksize"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.max_damp_retries, int) or self.max_damp_retries < 0:
            raise ConfigError(f"max_damp_retries={self.max_damp_retries!r} must be an integer >= 0")
        if not (isinstance(self.dampening, (int, float)) and self.dampening > 0):
            raise ConfigError(f"dampening={self.dampening!r} must be a positive float (typical: 0.01)")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} must be an integer")
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if value is None and name == "targets":
                continue
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ConfigError(f"{name} must be a list of regular expressions (strings), got {value!r}")
            for pattern in value:
                _check_regex(name, pattern)
            setattr(self, name, list(value))
        if not isinstance(self.layer_sparsity, dict):
            raise ConfigError(f"layer_sparsity must be a dict {{regex: sparsity}}, got {self.layer_sparsity!r}")
        for pattern, value in self.layer_sparsity.items():
            _check_regex("layer_sparsity", pattern)
            _check_fraction(f"layer_sparsity[{pattern!r}]", value)
        if not 0 <= self.owl_lambda < 1:
            raise ConfigError(f"owl_lambda={self.owl_lambda!r} must be in [0, 1) (paper default 0.08)")
        if self.owl and not (0 <= self.sparsity - self.owl_lambda and self.sparsity + self.owl_lambda < 1):
            raise ConfigError(
                f"owl_lambda={self.owl_lambda} around sparsity={self.sparsity} leaves [0, 1); lower owl_lambda"
            )
        if self.owl_threshold <= 0:
            raise ConfigError(f"owl_threshold={self.owl_threshold!r} must be > 0 (paper default 5)")
        self._validate_training()

    @property
    def structured_kind(self) -> str | None:
        """``"width"``, ``"depth"`` or ``"sublayer"`` for structured methods, else ``None``."""
        from .registry import get_method

        return getattr(get_method(self.method), "structured", None)

    def _validate_structured(self) -> None:
        kind = self.structured_kind
        if kind is None:
            if self.structure in STRUCTURED_KINDS:
                from .registry import available_methods, get_method

                names = [m for m in available_methods() if getattr(get_method(m), "structured", None) == self.structure]
                raise ConfigError(
                    f"structure={self.structure!r} is a structured-pruning kind, but method={self.method!r} zeroes "
                    f"weights; use structure='unstructured' or 'N:M', or a {self.structure} method: {names}"
                )
            return
        if self.structure in ("unstructured", kind):
            self.structure = kind
        else:
            raise ConfigError(
                f"structure={self.structure!r} does not fit method={self.method!r}, which removes {kind} "
                f"(structure={kind!r}); leave structure unset"
            )
        if self.sparsity is None or not 0 < float(self.sparsity) < 1:
            raise ConfigError(
                f"sparsity={self.sparsity!r}: for structured method {self.method!r} it is the fraction of decoder "
                "parameters to remove, a number in (0, 1), e.g. 0.2"
            )
        for name, allowed in (("width_units", WIDTH_UNITS), ("allocation", ALLOCATIONS), ("gqa_mode", GQA_MODES),
                              ("taylor_variant", TAYLOR_VARIANTS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed; allowed: {list(allowed)}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"round_to={self.round_to!r} must be a positive integer (1 = no rounding)")
        if isinstance(self.finercut_tokens, bool) or not isinstance(self.finercut_tokens, int) or self.finercut_tokens < 1:
            raise ConfigError(f"finercut_tokens={self.finercut_tokens!r} must be a positive integer (default 2048)")
        if self.reconstruct and kind != "width":
            raise ConfigError(f"reconstruct=True refits output projections after width pruning; method={self.method!r} "
                              f"removes {kind}. Use flap, wanda-sp or taylor, or reconstruct=False")
        for name in ("bias_compensation", "angular_last_token", "reconstruct"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.owl or self.layer_sparsity:
            raise ConfigError(
                f"owl and layer_sparsity apply to unstructured pruning; structured method {self.method!r} "
                "allocates per layer itself (allocation='global' or 'uniform')"
            )

    def _validate_training(self) -> None:
        """Fields used by `hf_prune.PruningCallback` (pruning during training)."""
        from .training.schedules import SCHEDULES, check_schedule

        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is unknown; allowed: {list(SCHEDULES)}")
        for name in ("start_step", "lottery_rewind_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an integer >= 0")
        for name in ("update_every", "lottery_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.end_step is not None:
            check_schedule(self.schedule, self.start_step, self.end_step, self.update_every)
        _check_fraction("initial_sparsity", self.initial_sparsity)
        if self.initial_sparsity > self.sparsity:  # type: ignore[operator]
            raise ConfigError(
                f"initial_sparsity={self.initial_sparsity} is above the final sparsity={self.sparsity}; "
                "the schedule only ever increases sparsity"
            )
        if not (isinstance(self.movement_threshold, (int, float)) and 0 < self.movement_threshold < 1):
            raise ConfigError(f"movement_threshold={self.movement_threshold!r} must be in (0, 1) (a threshold on sigmoid(S))")
        for name in ("movement_l1", "movement_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a number >= 0")
        if self.method == "lottery" and self.lottery_rewind_step > self.start_step:
            raise ConfigError(
                f"lottery_rewind_step={self.lottery_rewind_step} must be <= start_step={self.start_step}: survivors "
                "are rewound to weights saved before the first round prunes"
            )

    # ------------------------------------------------------------------ helpers
    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` for N:M structures, else ``None``."""
        return parse_structure(self.structure)

    def layer_override(self, module_name: str) -> float | None:
        """The first ``layer_sparsity`` value whose regex matches ``module_name``, else ``None``."""
        for pattern, value in self.layer_sparsity.items():
            if re.search(pattern, module_name):
                return float(value)
        return None

    def sparsity_for(self, module_name: str) -> float:
        """Target sparsity of one module (per-layer overrides first)."""
        override = self.layer_override(module_name)
        return float(self.sparsity) if override is None else override  # type: ignore[arg-type]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in known]
        if unknown:
            hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            msg = ", ".join(f"{k!r}" + (f" (did you mean {v[0]!r}?)" if v else "") for k, v in hints.items())
            raise ConfigError(f"unknown PruningConfig field(s): {msg}; allowed: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> PruningConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_model(cls, model: Any) -> PruningConfig | None:
        """The config a saved/loaded model was pruned with (``config.json``'s ``pruning_config``), if any."""
        stored = getattr(getattr(model, "config", model), "pruning_config", None)
        if not stored:
            return None
        data = dict(stored)
        for key in ("achieved_sparsity", "achieved_fraction", "hf_prune_version"):  # run metadata, not fields
            data.pop(key, None)
        return cls.from_dict(data)


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= float(value) < 1:
        raise ConfigError(f"{name}={value!r} must be a number in [0, 1) (fraction of weights set to zero)")


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{name}: {pattern!r} is not a valid regular expression ({exc})") from None
