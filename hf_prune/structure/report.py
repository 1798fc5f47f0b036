"""`StructuredReport`: what structured pruning removed, per block and in total; printable and saved as JSON.

Example:
    >>> from hf_prune.structure.report import BlockRow, StructuredReport
    >>> r = StructuredReport(method="flap", structure="width", target_fraction=0.2,
    ...                      blocks=[BlockRow(0, 1000, 800, mlp=(64, 48), heads=(4, 4), kv_heads=(2, 2))],
    ...                      params_before=5000, params_after=4800, decoder_params_before=1000, seconds=0.1,
    ...                      peak_rss_mb=100.0)
    >>> round(r.achieved_fraction, 2), r.params_removed
    (0.2, 200)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..report import REPORT_FILE, SavedReport


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

    @property
    def fraction_removed(self) -> float:
        return 1.0 - self.params_after / max(self.params_before, 1)


@dataclass
class StructuredReport(SavedReport):
    method: str
    structure: str
    target_fraction: float
    blocks: list[BlockRow]
    params_before: int
    params_after: int
    decoder_params_before: int
    seconds: float
    peak_rss_mb: float
    peak_device_mb: float | None = None
    device: str = "cpu"
    num_calibration_samples: int = 0
    seqlen: int = 0
    reload_path: str = "stock"  # "stock" (plain config fields) or "hf_prune" (per-layer shapes + remote code)
    config: dict[str, Any] = field(default_factory=dict)
    kind: str = "structured"

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    @property
    def achieved_fraction(self) -> float:
        """Parameters removed / decoder-block parameters before pruning (what ``sparsity`` targets)."""
        return self.params_removed / max(self.decoder_params_before, 1)

    # one-shot reports call it sparsity; the CLI and benchmarks read either name
    achieved_sparsity = achieved_fraction

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["params_removed"] = self.params_removed
        data["achieved_fraction"] = self.achieved_fraction
        for row, block in zip(data["blocks"], self.blocks):
            row["fraction_removed"] = block.fraction_removed
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructuredReport:
        data = {k: v for k, v in data.items() if k not in ("params_removed", "achieved_fraction")}
        blocks = []
        for row in data.pop("blocks"):
            row = {k: v for k, v in row.items() if k != "fraction_removed"}
            for key in ("mlp", "heads", "kv_heads"):
                if row.get(key) is not None:
                    row[key] = tuple(row[key])
            blocks.append(BlockRow(**row))
        return cls(blocks=blocks, **data)

    def table(self, max_rows: int | None = None) -> str:
        """Per-block table plus totals, as printed after pruning."""

        def units(pair: tuple[int, int] | None) -> str:
            return "-" if pair is None else f"{pair[0]}->{pair[1]}"

        head = f"{'block':>5} {'mlp channels':>13} {'heads':>8} {'kv heads':>8} {'removed':>14} {'params':>21} {'cut':>7}"
        lines = [head, "-" * len(head)]
        rows = self.blocks if max_rows is None or len(self.blocks) <= max_rows else self.blocks[:max_rows]
        for r in rows:
            params = f"{r.params_before:,}->{r.params_after:,}"
            lines.append(
                f"{r.block:>5} {units(r.mlp):>13} {units(r.heads):>8} {units(r.kv_heads):>8} {r.removed or '-':>14} "
                f"{params:>21} {r.fraction_removed:>7.1%}"
            )
        if len(rows) < len(self.blocks):
            lines.append(f"... {len(self.blocks) - len(rows)} more blocks (see {REPORT_FILE})")
        lines.append("-" * len(head))
        lines.append(
            f"{self.method} ({self.structure}): removed {self.params_removed:,} parameters = "
            f"{self.achieved_fraction:.2%} of {self.decoder_params_before:,} decoder-block parameters "
            f"(target {self.target_fraction:.1%})"
        )
        lines.append(
            f"model: {self.params_before:,} -> {self.params_after:,} parameters; reloads via "
            f"{'stock transformers' if self.reload_path == 'stock' else 'hf_prune or trust_remote_code=True'}"
        )
        dev = f", peak {self.device} memory {self.peak_device_mb:,.0f} MB" if self.peak_device_mb is not None else ""
        lines.append(f"time {self.seconds:.1f} s, peak RSS {self.peak_rss_mb:,.0f} MB{dev}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table(max_rows=40)


def load_report(data: dict[str, Any]) -> Any:
    """A `StructuredReport` or a `hf_prune.PruningReport`, whichever ``data`` (a saved report) describes."""
    if data.get("kind") == "structured":
        return StructuredReport.from_dict(data)
    from ..report import PruningReport

    return PruningReport.from_dict(data)
