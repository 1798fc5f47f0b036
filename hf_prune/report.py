"""`PruningReport`: what a pruning run did, per layer and in total; printable and saved as JSON.

Example:
    >>> from hf_prune.report import LayerRow, PruningReport
    >>> r = PruningReport(method="magnitude", structure="unstructured", target_sparsity=0.5,
    ...                   layers=[LayerRow("l.0.q", 0, [4, 4], 16, 8, 0.5)], total_params=32, seconds=0.1,
    ...                   peak_rss_mb=100.0)
    >>> round(r.achieved_sparsity, 2)
    0.5
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .io.atomic import atomic_write_text  # re-exported: cli.py and benchmarks/ import it from here

REPORT_FILE = "pruning_report.json"


class SavedReport:
    """JSON and ``pruning_report.json`` for report classes that define ``to_dict``."""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

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
class PruningReport(SavedReport):
    method: str
    structure: str
    target_sparsity: float
    layers: list[LayerRow]
    total_params: int
    seconds: float
    peak_rss_mb: float
    peak_device_mb: float | None = None
    device: str = "cpu"
    num_calibration_samples: int = 0
    seqlen: int = 0
    block_sparsity: list[float] | None = None
    skipped: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["achieved_sparsity"] = self.achieved_sparsity
        data["pruned_params"] = self.pruned_params
        data["total_nonzero"] = self.total_nonzero
        for row, layer in zip(data["layers"], self.layers):
            row["sparsity"] = layer.sparsity
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningReport:
        data = dict(data)
        for key in ("achieved_sparsity", "pruned_params", "total_nonzero"):
            data.pop(key, None)
        layers = []
        for row in data.pop("layers"):
            row = dict(row)
            row.pop("sparsity", None)
            layers.append(LayerRow(**row))
        return cls(layers=layers, **data)

    def table(self, max_rows: int | None = None) -> str:
        """Per-layer table plus totals, as printed after pruning."""
        head = f"{'layer':<52} {'shape':>13} {'params':>10} {'nonzero':>10} {'target':>7} {'sparsity':>8}"
        lines = [head, "-" * len(head)]
        rows = self.layers if max_rows is None or len(self.layers) <= max_rows else self.layers[:max_rows]
        for r in rows:
            shape = "x".join(str(s) for s in r.shape)
            lines.append(
                f"{r.name[-52:]:<52} {shape:>13} {r.params:>10,} {r.nonzero:>10,} {r.target_sparsity:>7.1%} {r.sparsity:>8.2%}"
            )
        if len(rows) < len(self.layers):
            lines.append(f"... {len(self.layers) - len(rows)} more layers (see pruning_report.json)")
        lines.append("-" * len(head))
        dev = f", peak {self.device} memory {self.peak_device_mb:,.0f} MB" if self.peak_device_mb is not None else ""
        lines.append(
            f"{self.method} {self.structure}: {len(self.layers)} layers, {self.pruned_params:,} prunable params, "
            f"achieved sparsity {self.achieved_sparsity:.2%} (target {self.target_sparsity:.1%})"
        )
        lines.append(
            f"model: {self.total_params:,} params, {self.total_nonzero:,} non-zero "
            f"({1 - self.total_nonzero / max(self.total_params, 1):.2%} zeros overall)"
        )
        lines.append(f"time {self.seconds:.1f} s, peak RSS {self.peak_rss_mb:,.0f} MB{dev}")
        if self.skipped:
            lines.append(f"not pruned (unsupported): {'; '.join(self.skipped)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table(max_rows=40)

