"""Reports of every family, one module: what a run did, per layer or block and in total; printed as a table,
saved as ``pruning_report.json`` the same way (`Report.save`), read back with `load_report`.

* `PruningReport` (``kind="oneshot"``): zeroed weights, per layer (one-shot methods, and the training callback's
  final masks);
* `StructuredReport` (``kind="structured"``): removed parameters, per original decoder block.

Example:
    >>> from hf_prune.report import BlockRow, LayerRow, PruningReport, StructuredReport, load_report
    >>> r = PruningReport(method="magnitude", structure="unstructured", target_sparsity=0.5,
    ...                   layers=[LayerRow("l.0.q", 0, [4, 4], 16, 8, 0.5)], total_params=32, seconds=0.1,
    ...                   peak_rss_mb=100.0)
    >>> round(r.achieved_sparsity, 2)
    0.5
    >>> s = StructuredReport(method="flap", structure="width", target_fraction=0.2,
    ...                      blocks=[BlockRow(0, 1000, 800, mlp=(64, 48), heads=(4, 4), kv_heads=(2, 2))],
    ...                      params_before=5000, params_after=4800, decoder_params_before=1000, seconds=0.1,
    ...                      peak_rss_mb=100.0)
    >>> round(s.achieved_fraction, 2), s.params_removed, type(load_report(s.to_dict())).__name__
    (0.2, 200, 'StructuredReport')
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import KW_ONLY, asdict, dataclass, field
from typing import Any, ClassVar

from .io.atomic import atomic_write_text  # re-exported: cli.py and benchmarks/ import it from here
from .io.save import REPORT_FILE


@dataclass
class Report:
    """Base of every report: what ran (``method``, ``structure``, ``kind``), its cost (time, peak memory, device,
    calibration), the config, one row per layer or block, a printable ``table``, JSON (``to_dict``/``from_dict``)
    and ``save`` into ``pruning_report.json``. Subclasses name their rows (``ROWS``, ``ROW_TYPE``) and the
    derived values added to the JSON (``DERIVED``, ``ROW_DERIVED``)."""

    method: str
    structure: str
    _: KW_ONLY
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_device_mb: float | None = None
    device: str = "cpu"
    num_calibration_samples: int = 0
    seqlen: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    kind: str = "oneshot"
    #: named calibration sources (`hf_prune.core.sources.CalibrationMix.summary`): name, samples, tokens, share
    #: (and side and weight under dual importance); ``None`` for a single source
    calibration_sources: list[dict[str, Any]] | None = None
    #: results of evaluations run on the saved checkpoint (`hf_prune.card.record_evaluation`): ``perplexity``,
    #: ``dense_perplexity`` (`hf_prune.evaluate.PerplexityResult.to_dict`), ``lm_eval`` ({task: {metric: value}})
    evaluation: dict[str, Any] = field(default_factory=dict)

    ROWS: ClassVar[str] = ""
    ROW_TYPE: ClassVar[type] = object
    DERIVED: ClassVar[tuple[str, ...]] = ()
    ROW_DERIVED: ClassVar[tuple[str, ...]] = ()

    def config_fields(self) -> dict[str, Any]:
        """Run results stored beside the config in ``config.json``'s ``pruning_config``."""
        return {"achieved_sparsity": round(float(self.achieved_sparsity), 6)}  # type: ignore[attr-defined]

    def table(self, max_rows: int | None = None) -> str:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def __str__(self) -> str:
        return self.table(max_rows=40)

    def rows_table(self, head: str, line: Any, noun: str, max_rows: int | None) -> list[str]:
        """``head``, a rule, ``line(row)`` for the first ``max_rows`` rows (a ``... N more`` line for the rest),
        a rule: the body every report's table shares."""
        rows = getattr(self, self.ROWS)
        shown = rows if max_rows is None or len(rows) <= max_rows else rows[:max_rows]
        lines = [head, "-" * len(head), *(line(r) for r in shown)]
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more {noun} (see {REPORT_FILE})")
        return [*lines, "-" * len(head)]

    def sources_line(self) -> str:
        """``calibration: general 64 samples (50%), domain 64 (50%)`` (and the dual-importance weights)."""
        parts = [f"{s['name']} {s['samples']} samples ({s['share']:.0%})" for s in self.calibration_sources or ()]
        dual = [s for s in self.calibration_sources or () if s.get("side") == "domain"]
        extra = f"; dual importance general + {dual[0]['weight']:g} x {dual[0]['name']}" if dual else ""
        return "calibration: " + ", ".join(parts) + extra

    def cost_line(self) -> str:
        """``time ..., peak RSS ...`` (and peak device memory when measured)."""
        dev = f", peak {self.device} memory {self.peak_device_mb:,.0f} MB" if self.peak_device_mb is not None else ""
        return f"time {self.seconds:.1f} s, peak RSS {self.peak_rss_mb:,.0f} MB{dev}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update({name: getattr(self, name) for name in self.DERIVED})
        for row, obj in zip(data[self.ROWS], getattr(self, self.ROWS)):
            row.update({name: getattr(obj, name) for name in self.ROW_DERIVED})
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        data = {k: v for k, v in data.items() if k not in cls.DERIVED}
        kinds = {f.name: str(f.type) for f in dataclasses.fields(cls.ROW_TYPE)}
        rows = []
        for row in data.pop(cls.ROWS):
            row = {k: v for k, v in row.items() if k in kinds}
            rows.append(cls.ROW_TYPE(**{k: tuple(v) if "tuple" in kinds[k] and v is not None else v
                                        for k, v in row.items()}))
        return cls(**{cls.ROWS: rows}, **data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``pruning_report.json`` into ``directory`` atomically; return its path."""
        path = os.path.join(os.fspath(directory), REPORT_FILE)
        atomic_write_text(path, self.to_json())
        return path


@dataclass
class LayerRow:
    name: str
    block: int
    shape: list[int]
    params: int
    nonzero: int
    target_sparsity: float

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / max(self.params, 1)


@dataclass
class PruningReport(Report):
    """Zeroed weights per layer: one-shot methods (``kind="oneshot"``) and the final masks of
    `hf_prune.PruningCallback` (``kind="training"``)."""

    target_sparsity: float = 0.0
    layers: list[LayerRow] = field(default_factory=list)
    total_params: int = 0
    block_sparsity: list[float] | None = None
    owl_choice: dict | None = None  # OWL: the hyper-parameters used (and with 'auto', the search's losses)
    skipped: list[str] = field(default_factory=list)
    history: list[list[float]] | None = None  # training: [step, target, mask sparsity] at every mask update

    ROWS: ClassVar[str] = "layers"
    ROW_TYPE: ClassVar[type] = LayerRow
    DERIVED: ClassVar[tuple[str, ...]] = ("achieved_sparsity", "pruned_params", "total_nonzero")
    ROW_DERIVED: ClassVar[tuple[str, ...]] = ("sparsity",)

    @property
    def pruned_params(self) -> int:
        """Parameters in the pruned layers."""
        return sum(r.params for r in self.layers)

    @property
    def achieved_sparsity(self) -> float:
        """Zeros / parameters over the pruned layers."""
        return 1.0 - sum(r.nonzero for r in self.layers) / max(self.pruned_params, 1)

    @property
    def total_nonzero(self) -> int:
        """Non-zero parameters of the whole model, assuming unpruned parameters are dense."""
        return self.total_params - sum(r.params - r.nonzero for r in self.layers)

    def table(self, max_rows: int | None = None) -> str:
        """Per-layer table plus totals, as printed after pruning."""
        head = f"{'layer':<52} {'shape':>13} {'params':>10} {'nonzero':>10} {'target':>7} {'sparsity':>8}"

        def line(r: LayerRow) -> str:
            shape = "x".join(str(s) for s in r.shape)
            return (f"{r.name[-52:]:<52} {shape:>13} {r.params:>10,} {r.nonzero:>10,} {r.target_sparsity:>7.1%} "
                    f"{r.sparsity:>8.2%}")

        lines = self.rows_table(head, line, "layers", max_rows)
        lines.append(
            f"hf_prune {self.method} {self.structure}: {len(self.layers)} layers, {self.pruned_params:,} prunable params, "
            f"achieved sparsity {self.achieved_sparsity:.2%} (target {self.target_sparsity:.1%})"
        )
        lines.append(
            f"model: {self.total_params:,} params, {self.total_nonzero:,} non-zero "
            f"({1 - self.total_nonzero / max(self.total_params, 1):.2%} zeros overall)"
        )
        lines.append(self.cost_line())
        if self.calibration_sources:
            lines.append(self.sources_line())
        if self.owl_choice:
            lines.append(owl_line(self.owl_choice, self.block_sparsity))
        if self.skipped:
            lines.append(f"not pruned (unsupported): {'; '.join(self.skipped)}")
        return "\n".join(lines)


def owl_line(choice: dict, block_sparsity: list[float] | None) -> str:
    """One line on what OWL chose, e.g. ``OWL: owl threshold=5.0 lambda=-0.04 (search loss 4.77, uniform
    4.83, 20 candidates); block sparsity 0.56-0.64``."""
    params = " ".join(f"{k}={v}" for k, v in choice.items() if k not in ("kind", "search_loss", "uniform_loss",
                                                                           "candidates"))
    text = f"OWL: {choice.get('kind', 'owl')}{' ' + params if params else ''}"
    if choice.get("search_loss") is not None:
        text += (f" (search loss {choice['search_loss']:.4f}, uniform {choice['uniform_loss']:.4f}, "
                 f"{choice['candidates']} candidates)")
    if block_sparsity:
        text += f"; block sparsity {min(block_sparsity):.3f}-{max(block_sparsity):.3f}"
    return text


@dataclass
class BlockRow:
    """One original decoder block: parameters before/after and its units before/after (``None``: unchanged)."""

    block: int
    params_before: int
    params_after: int
    mlp: tuple[int, int] | None = None
    heads: tuple[int, int] | None = None
    kv_heads: tuple[int, int] | None = None
    removed: str | None = None  # "block", "attention", "mlp", "attention+mlp"
    experts: tuple[int, int] | None = None  # routed experts before -> after (MoE blocks)

    @property
    def fraction_removed(self) -> float:
        return 1.0 - self.params_after / max(self.params_before, 1)


@dataclass
class StructuredReport(Report):
    """Removed parameters per original decoder block (structured methods, ``kind="structured"``)."""

    target_fraction: float = 0.0
    blocks: list[BlockRow] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    decoder_params_before: int = 0
    reload_path: str = "stock"  # "stock" (plain config fields) or "hf_prune" (per-layer shapes + remote code)
    kind: str = field(default="structured", kw_only=True)

    ROWS: ClassVar[str] = "blocks"
    ROW_TYPE: ClassVar[type] = BlockRow
    DERIVED: ClassVar[tuple[str, ...]] = ("params_removed", "achieved_fraction")
    ROW_DERIVED: ClassVar[tuple[str, ...]] = ("fraction_removed",)

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    @property
    def achieved_fraction(self) -> float:
        """Parameters removed / decoder-block parameters before pruning (what ``sparsity`` targets). Hidden-size
        pruning also shrinks the embeddings: there, the decoder blocks' own parameters removed."""
        if self.structure == "hidden" and self.blocks:
            return 1.0 - sum(b.params_after for b in self.blocks) / max(sum(b.params_before for b in self.blocks), 1)
        return self.params_removed / max(self.decoder_params_before, 1)

    # one-shot reports call it sparsity; the CLI and benchmarks read either name
    achieved_sparsity = achieved_fraction

    def config_fields(self) -> dict[str, Any]:
        return {"achieved_fraction": round(self.achieved_fraction, 6)}

    def table(self, max_rows: int | None = None) -> str:
        """Per-block table plus totals, as printed after pruning."""

        def units(pair: tuple[int, int] | None) -> str:
            return "-" if pair is None else f"{pair[0]}->{pair[1]}"

        moe = any(r.experts is not None for r in self.blocks)
        head = (f"{'block':>5} {'mlp channels':>13} {'heads':>8} {'kv heads':>8}" + (f" {'experts':>8}" if moe else "")
                + f" {'removed':>14} {'params':>21} {'cut':>7}")

        def line(r: BlockRow) -> str:
            params = f"{r.params_before:,}->{r.params_after:,}"
            return (f"{r.block:>5} {units(r.mlp):>13} {units(r.heads):>8} {units(r.kv_heads):>8}"
                    + (f" {units(r.experts):>8}" if moe else "")
                    + f" {r.removed or '-':>14} {params:>21} {r.fraction_removed:>7.1%}")

        lines = self.rows_table(head, line, "blocks", max_rows)
        if self.structure == "experts":
            info = (self.config or {}).get("plan_info", {})
            before, after = info.get("experts_before", 0), info.get("experts_after", 0)
            lines.append(f"{self.method} (experts): removed {before - after} of {before} routed experts "
                         f"(target {self.target_fraction:.1%}) = "
                         f"{self.params_removed:,} parameters, {self.achieved_fraction:.2%} of "
                         f"{self.decoder_params_before:,} decoder-block parameters")
        elif self.structure == "hidden":
            info = (self.config or {}).get("plan_info", {})
            tied = ("tied embeddings kept" if info.get("tied") else
                    f"embeddings untied ({info.get('untied_reason')})" if info.get("was_tied") else "untied embeddings")
            lines.append(f"{self.method} (hidden): hidden size {info.get('hidden_before')} -> {info.get('hidden_after')}"
                         f", removed {self.params_removed:,} parameters ({self.params_removed / max(self.params_before, 1):.2%}"
                         f" of the model, {self.achieved_fraction:.2%} of the decoder blocks); {tied}")
        else:
            lines.append(
                f"{self.method} ({self.structure}): removed {self.params_removed:,} parameters = "
                f"{self.achieved_fraction:.2%} of {self.decoder_params_before:,} decoder-block parameters "
                f"(target {self.target_fraction:.1%})"
            )
        lines.append(
            f"model: {self.params_before:,} -> {self.params_after:,} parameters; reloads via "
            f"{'stock transformers' if self.reload_path == 'stock' else 'hf_prune or trust_remote_code=True'}"
        )
        lines.append(self.cost_line())
        if self.calibration_sources:
            lines.append(self.sources_line())
        return "\n".join(lines)


def attach_report(model: Any, config: Any, report: Report) -> None:
    """Record a finished run on ``model``, the same way for every family: ``model.config.pruning_config`` (the
    config, the run's results and the hf_prune version; written to config.json) and the report that
    ``save_pretrained`` writes next to the weights as ``pruning_report.json``."""
    from ._version import __version__

    if getattr(model, "config", None) is not None:
        model.config.pruning_config = {**config.to_dict(), **report.config_fields(), "hf_prune_version": __version__}
    model._hf_prune_report = report


def load_report(data: dict[str, Any]) -> Report:
    """The report ``data`` (a saved ``pruning_report.json``) describes, by its ``kind``."""
    if data.get("kind") == "structured":
        return StructuredReport.from_dict(data)
    return PruningReport.from_dict(data)
