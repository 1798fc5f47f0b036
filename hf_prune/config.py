"""`PruningConfig`: one validated, JSON-serialisable description of a pruning job.

A config holds the fields every family shares (method, sparsity, structure, targets/ignore, calibration, seed)
and one options object, the dataclass the method registered (`hf_prune.registry`). Options are written once:
each field carries its ``help`` (and ``choices``) in its metadata, and the CLI builds its flags from them.
Option fields may be passed flat (``PruningConfig(method="sparsegpt", blocksize=64)``) or as an object
(``options=SparseGPTOptions(blocksize=64)``); an option of another method is refused by name.

Example:
    >>> import hf_prune
    >>> from hf_prune import PruningConfig
    >>> cfg = PruningConfig(method="sparsegpt", sparsity=0.5, structure="2:4", blocksize=64)
    >>> cfg.nm, cfg.options.blocksize
    ((2, 4), 64)
    >>> PruningConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .registry import all_option_classes, available_methods, get_spec

#: Module-name patterns (regular expressions, `re.search`) never pruned by default.
DEFAULT_IGNORE: tuple[str, ...] = (
    r"(^|\.)lm_head$",
    r"embed",
    r"(^|\.)(wte|wpe)$",
    r"(^|\.)score$",
    r"(^|\.)(router|gate)$",  # MoE routers (Mixtral/Qwen-MoE "mlp.gate"); never "gate_proj"
    r"shared_expert_gate$",
)

#: ``structure`` values of structured methods (`hf_prune.structure`): what a method physically removes.
STRUCTURED_KINDS = ("width", "depth", "sublayer", "experts")
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


# ---------------------------------------------------------------------------------------------- method options

Check = Callable[[Any], "str | None"]


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
           check: Check | None = None, default_factory: Any = dataclasses.MISSING,
           parse: Callable[[str], Any] | None = None) -> Any:
    """A `MethodOptions` field: its default, its ``help`` line (the CLI's and the docs'), and optionally the
    allowed ``choices`` or a ``check(value) -> error text | None``. Validated in ``__post_init__``. ``parse``
    converts the CLI's text where the default's type does not say how (e.g. `number_or_auto`)."""
    meta = {"help": help, "choices": choices, "check": check, "parse": parse}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def number_or_auto(text: str) -> float | str:
    """CLI parser of options that take a number or ``"auto"``.

    >>> number_or_auto("auto"), number_or_auto("0.1")
    ('auto', 0.1)
    """
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def positive_int(value: Any) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else "a positive integer"


def non_negative_int(value: Any) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else "an integer >= 0"


def non_negative(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    return None if ok else "a number >= 0"


def positive(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return None if ok else "a number > 0"


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "True or False"


def fraction(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= float(value) < 1
    return None if ok else "a number in [0, 1)"


@dataclass
class MethodOptions:
    """Base of a method's options: a dataclass whose fields are declared with `option` (help on every field).

    Each field is checked in ``__post_init__`` against its ``choices``/``check``; `check_config` adds checks
    that need the common fields (sparsity, structure) and runs when the `PruningConfig` is validated.
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices, check = f.metadata.get("choices"), f.metadata.get("check")
            if choices is not None and value not in choices:
                raise ConfigError(f"{f.name}={value!r} is unknown; allowed: {list(choices)}")
            if check is not None:
                wanted = check(value)
                if wanted:
                    raise ConfigError(f"{f.name}={value!r} must be {wanted}")

    def check_config(self, config: PruningConfig) -> None:
        """Checks across this object and the common fields of ``config``; raise `ConfigError`."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def option_fields(cls: type) -> dict[str, dataclasses.Field]:
    """``name -> Field`` of an options class (inherited fields included)."""
    return {f.name: f for f in dataclasses.fields(cls)}


def _owners(name: str) -> list[str]:
    """Methods whose options have a field ``name``."""
    out = []
    for method in available_methods():
        opts = get_spec(method).options
        if opts is not None and name in option_fields(opts):
            out.append(method)
    return out


#: defaults of earlier releases, still accepted silently where an option does not apply (saved configs carry
#: every option of their method)
_OLD_DEFAULTS: dict[str, Any] = {"owl_lambda": 0.08, "owl_threshold": 5.0}


def _foreign_default(name: str) -> Any:
    """The default of option ``name`` in whichever method declares it (``AttributeError`` if none does)."""
    for cls in all_option_classes():
        f = option_fields(cls).get(name)
        if f is not None:
            return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    raise AttributeError(name)


def _check_foreign_value(name: str, value: Any) -> None:
    """Validate ``value`` against the declaration of option ``name`` in the first class that has it."""
    for cls in all_option_classes():
        f = option_fields(cls).get(name)
        if f is None:
            continue
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if choices is not None and value not in choices:
            raise ConfigError(f"{name}={value!r} is unknown; allowed: {list(choices)}")
        wanted = check(value) if check is not None else None
        if wanted:
            raise ConfigError(f"{name}={value!r} must be {wanted}")
        return


_COMMON = ("method", "sparsity", "structure", "targets", "ignore", "num_calibration_samples", "seqlen",
           "batch_size", "seed", "restore_on_error", "calibration_weights", "domain_weight", "domain_source")


@dataclass(init=False, eq=False)
class PruningConfig:
    """What to prune, how much, and with which calibration; the method's own options in ``options``.

    Args:
        method: registered method name (`hf_prune.available_methods()`): one-shot ``"magnitude"``,
            ``"wanda"``, ``"sparsegpt"``, ``"ria"``; structured ``"flap"``, ``"wanda-sp"``, ``"taylor"``,
            ``"block-influence"``, ``"angular"``, ``"finercut"``; training ``"gmp"``, ``"movement"``,
            ``"soft_movement"``, ``"lottery"``.
        sparsity: fraction of weights set to zero in each targeted layer, in [0, 1). For N:M structures it
            may be omitted (it is ``1 - N/M``); if given it must equal ``1 - N/M``. For structured methods, the
            fraction of decoder-block *parameters* removed.
        structure: ``"unstructured"`` or ``"N:M"`` (keep N of every M consecutive input weights per row); for
            structured methods their kind (``"width"``, ``"depth"``, ``"sublayer"``; filled in when omitted).
        targets: regexes (``re.search`` on the full module name) selecting modules to prune. ``None`` means
            every linear layer (and fused MoE expert tensor) inside the repeated decoder blocks.
        ignore: regexes of modules never pruned (default: lm_head, embeddings, classification heads, routers).
        num_calibration_samples: number of calibration sequences.
        seqlen: tokens per calibration sequence.
        batch_size: calibration sequences per forward pass through a block.
        seed: seed for sampling calibration windows.
        restore_on_error: keep a CPU copy of each block's original weights so that a failure half-way
            restores the model. Turn off for models that do not fit twice in CPU memory; a failed run
            then marks the model as incomplete and `save_pretrained` refuses it.
        calibration_weights: with named calibration sources (``calibration={"general": ..., "domain": ...}``),
            each source's share of the ``num_calibration_samples`` windows, e.g. ``{"general": 1, "domain": 3}``
            (normalised; default equal shares). See `hf_prune.core.sources`.
        domain_weight: λ of dual importance (D-Pruner style): statistics are kept separately for the domain
            source and the general ones, each normalised to its own scale, and the methods see
            ``general + λ · domain``. Needs a source named ``domain_source``. For the methods that read
            activation statistics: wanda, sparsegpt, ria, admm (and OWL), flap, wanda-sp. ``None``: off.
        domain_source: the name of the domain source for ``domain_weight`` (default ``"domain"``).
        options: the method's options object (its registered dataclass); built from ``**option_values`` (or
            defaults) when omitted.
        **option_values: fields of the method's options, flat (``blocksize=64`` for sparsegpt). Reading
            ``config.<option>`` returns ``config.options.<option>``.
    """

    method: str
    sparsity: float | None
    structure: str
    targets: list[str] | None
    ignore: list[str]
    num_calibration_samples: int
    seqlen: int
    batch_size: int
    seed: int
    restore_on_error: bool
    calibration_weights: dict[str, float] | None
    domain_weight: float | None
    domain_source: str
    options: MethodOptions | None

    def __init__(self, method: str = "wanda", sparsity: float | None = 0.5, structure: str = "unstructured",
                 targets: list[str] | None = None, ignore: list[str] | None = None,
                 num_calibration_samples: int = 128, seqlen: int = 512, batch_size: int = 8, seed: int = 0,
                 restore_on_error: bool = True, calibration_weights: dict[str, float] | None = None,
                 domain_weight: float | None = None, domain_source: str = "domain",
                 options: MethodOptions | None = None, **option_values: Any) -> None:
        self.method, self.sparsity, self.structure = method, sparsity, structure
        self.targets = targets
        self.ignore = list(DEFAULT_IGNORE) if ignore is None else ignore
        self.num_calibration_samples, self.seqlen, self.batch_size = num_calibration_samples, seqlen, batch_size
        self.seed, self.restore_on_error = seed, restore_on_error
        self.calibration_weights, self.domain_weight, self.domain_source = calibration_weights, domain_weight, domain_source
        self._check_method()
        self.options = self._build_options(options, option_values)
        self.validate()

    # ------------------------------------------------------------------ options
    def _check_method(self) -> None:
        names = available_methods()
        if not isinstance(self.method, str) or self.method not in names:
            close = difflib.get_close_matches(str(self.method), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"method={self.method!r} is unknown; allowed: {sorted(names)}.{hint}")

    def _build_options(self, options: MethodOptions | None, values: dict[str, Any]) -> MethodOptions | None:
        cls = get_spec(self.method).options
        if options is not None:
            if values:
                raise ConfigError(f"pass the options of {self.method!r} either as options=... or as keywords, "
                                  f"not both (got options and {sorted(values)})")
            if cls is None or not isinstance(options, cls):
                wanted = "no options" if cls is None else f"a {cls.__name__}"
                raise ConfigError(f"options={type(options).__name__}(...) does not fit method={self.method!r}, "
                                  f"which takes {wanted}")
            return options
        known = set(option_fields(cls)) if cls is not None else set()
        values = dict(values)
        family = get_spec(self.method).family
        # one-shot methods also run inside PruningCallback (a constant mask), next to the training methods
        siblings = {family, "training"} if family == "oneshot" else {family}
        for key in [k for k in values if k not in known and _owners(k)]:
            owners = _owners(key)
            _check_foreign_value(key, values[key])
            if not any(get_spec(m).family in siblings for m in owners):
                raise ConfigError(f"{key} is an option of {owners}, not of {family} method {self.method!r}; "
                                  f"its options: {sorted(known) if known else 'none'}")
            # A documented fallback: an option of a sibling method (same family; a helper that builds
            # configs for several methods) is dropped with a warning.
            warnings.warn(f"PruningConfig: {key}={values[key]!r} is an option of {owners}, not of "
                          f"method={self.method!r}; ignored", UserWarning, stacklevel=3)
            del values[key]
        unknown = [k for k in values if k not in known]
        if unknown:
            parts = []
            for k in unknown:
                close = difflib.get_close_matches(k, [*known, *_COMMON], n=1)
                parts.append(f"{k!r} is unknown" + (f" (did you mean {close[0]!r}?)" if close else ""))
            allowed = sorted(known) if known else "none"
            raise ConfigError("; ".join(parts) + f". Options of {self.method!r}: {allowed}; common fields: "
                              f"{list(_COMMON)}; all methods and their options: `hf-prune prune --help`")
        return None if cls is None else cls(**values)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: option fields read through the config. An option the method
        # does not have reads as its default in the method that declares it (what applies when unused).
        if name.startswith("__") or name == "options":
            raise AttributeError(name)
        options = self.__dict__.get("options")
        if options is not None and name in option_fields(type(options)):
            return getattr(options, name)
        try:
            return _foreign_default(name)
        except AttributeError:
            raise AttributeError(f"PruningConfig has no field or option {name!r}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PruningConfig) and self.to_dict() == other.to_dict()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field; raise `ConfigError` naming the field and what is allowed."""
        self._check_method()
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
        if self.sparsity is None:
            raise ConfigError("sparsity is required for structure='unstructured': a float in [0, 1), e.g. 0.5")
        check_fraction("sparsity", self.sparsity)
        self.sparsity = float(self.sparsity)
        for name in ("num_calibration_samples", "seqlen", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} must be an integer")
        if not isinstance(self.restore_on_error, bool):
            raise ConfigError(f"restore_on_error={self.restore_on_error!r} must be True or False")
        self._validate_sources()
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if value is None and name == "targets":
                continue
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ConfigError(f"{name} must be a list of regular expressions (strings), got {value!r}")
            for pattern in value:
                check_regex(name, pattern)
            setattr(self, name, list(value))
        if self.options is not None:
            self.options.check_config(self)

    def _validate_sources(self) -> None:
        weights = self.calibration_weights
        if weights is not None:
            bad = not isinstance(weights, dict) or not weights or any(
                not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0
                or not math.isfinite(v) for k, v in weights.items())
            if bad:
                raise ConfigError(f"calibration_weights={weights!r} must map calibration source names to numbers "
                                  ">= 0, e.g. {'general': 1, 'domain': 1}")
            if not sum(weights.values()) > 0:
                raise ConfigError(f"calibration_weights={weights!r} sum to 0; they must sum to a positive number")
            self.calibration_weights = {k: float(v) for k, v in weights.items()}
        lam = self.domain_weight
        if lam is not None:
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (lam >= 0 and math.isfinite(lam)):
                raise ConfigError(f"domain_weight={lam!r} must be a number >= 0 (λ in general + λ · domain), or None "
                                  "for no dual importance")
            self.domain_weight = float(lam)
            owl = self.family == "oneshot" and bool(getattr(self.options, "owl", False))
            if not (_supports_dual(self.method) or owl):
                raise ConfigError(
                    f"domain_weight (dual importance) does not apply to method={self.method!r}: it needs per-source "
                    f"activation statistics, which {sorted(m for m in available_methods() if _supports_dual(m))} "
                    "read. Mix the sources with calibration_weights instead")
        if not isinstance(self.domain_source, str) or not self.domain_source:
            raise ConfigError(f"domain_source={self.domain_source!r} must be the (non-empty) name of a calibration source")

    @property
    def family(self) -> str:
        """``"oneshot"``, ``"structured"`` or ``"training"`` (`hf_prune.registry.FAMILIES`)."""
        return get_spec(self.method).family

    @property
    def structured_kind(self) -> str | None:
        """``"width"``, ``"depth"`` or ``"sublayer"`` for structured methods, else ``None``."""
        return get_spec(self.method).structured_kind

    def _validate_structured(self) -> None:
        kind = self.structured_kind
        if kind is None:
            if self.structure in STRUCTURED_KINDS:
                names = [m for m in available_methods() if get_spec(m).structured_kind == self.structure]
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

    # ------------------------------------------------------------------ helpers
    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` for N:M structures, else ``None``."""
        return parse_structure(self.structure)

    def layer_override(self, module_name: str) -> float | None:
        """The first ``layer_sparsity`` value whose regex matches ``module_name``, else ``None``."""
        for pattern, value in (getattr(self, "layer_sparsity", None) or {}).items():
            if re.search(pattern, module_name):
                return float(value)
        return None

    def sparsity_for(self, module_name: str) -> float:
        """Target sparsity of one module (per-layer overrides first)."""
        override = self.layer_override(module_name)
        return float(self.sparsity) if override is None else override  # type: ignore[arg-type]

    def replace(self, **changes: Any) -> PruningConfig:
        """A validated copy with ``changes`` (common fields or this method's options; a new ``method`` keeps
        only the options it shares with the old one)."""
        data = self.to_dict()
        if "method" in changes and changes["method"] != self.method:
            new = get_spec(changes["method"]).options
            keep = set(option_fields(new)) if new is not None else set()
            data = {k: v for k, v in data.items() if k in _COMMON or k in keep}
        return PruningConfig(**{**data, **changes})

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Common fields plus this method's options, flat (the ``pruning_config`` entry of config.json)."""
        out = {name: copy.deepcopy(getattr(self, name)) for name in _COMMON}
        if self.options is not None:
            out.update(self.options.to_dict())
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        """Inverse of `to_dict`. Also reads configs saved by hf_prune 0.1 (every option of every family in one
        flat dict): options of other methods are dropped when they hold their default, and refused otherwise."""
        data = dict(data)
        method = data.get("method", "wanda")
        if method == "loraprune" and "loraprune_average" in data and "loraprune_importance" not in data:
            data["loraprune_importance"] = "lora"  # saved before the option existed: the paper's estimate ranked
        try:
            opts = get_spec(method).options
        except KeyError:
            opts = None  # the constructor names the unknown method
        own = set(option_fields(opts)) if opts is not None else set()
        for key in [k for k in data if k not in _COMMON and k not in own]:
            try:
                default = _foreign_default(key)
            except AttributeError:
                continue  # unknown everywhere: the constructor refuses it with a hint
            if data[key] == default or (key in _OLD_DEFAULTS and data[key] == _OLD_DEFAULTS[key]):
                del data[key]
            else:
                warnings.warn(f"pruning config: option {key}={data[key]!r} does not apply to method={method!r} "
                              f"(it belongs to {_owners(key)}); ignored", stacklevel=2)
                del data[key]
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


def _supports_dual(method: str) -> bool:
    probe = getattr(get_spec(method).implementation, "supports_dual", None)
    return bool(probe()) if callable(probe) else False


def check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= float(value) < 1:
        raise ConfigError(f"{name}={value!r} must be a number in [0, 1) (fraction of weights set to zero)")


def check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{name}: {pattern!r} is not a valid regular expression ({exc})") from None
