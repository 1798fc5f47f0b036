"""Named calibration sources: a seeded mixture of several corpora, and the general/domain split of dual importance.

``calibration={"general": wiki_texts, "domain": code_texts}`` (any source `build_calibration` accepts, per name)
becomes one token tensor ``[num_samples, seqlen]`` whose rows come from each source in turn, in the order the
names were given; ``calibration_weights`` sets each source's share of the samples (largest remainder; default
equal shares), and each source draws its windows with its own seed (``seed + position``), so adding a source
does not change the windows of the others. `CalibrationMix` records which rows came from which source.

Dual importance (``domain_weight=λ``, D-Pruner style): statistics are accumulated separately for the *general*
rows (every source except ``domain_source``) and the *domain* rows, each normalised to its own scale, and
combined as ``general + λ · domain`` (`combine_second_moments`). For the saliencies hf_prune's methods use --
the expected squared change of a layer's output, ``w² E[x²]`` (Wanda's score squared, wanda-sp) and the OBS
error ``Δwᵀ H Δw`` (SparseGPT, ADMM) -- that sum of the two sources' saliencies is exactly the saliency under the
combined second moments, so every method that reads `InputStats` gets it unchanged. Each source's statistic is
divided by its mean diagonal before the sum, so λ weighs the sources as such, not by how loud their activations
are (code text and prose reach a layer with different magnitudes).

The pipelines learn which batch is which through `active_mix`/`batch_tags` (set by `hf_prune.prune` around one
run with `use_mix`), so the methods' signatures do not change. Batches never straddle the general/domain
boundary (`dual_batch_size`).

Example:
    >>> import torch
    >>> from hf_prune.core.sources import allocate_samples, build_mixture
    >>> allocate_samples({"general": 1.0, "domain": 3.0}, 10)
    {'general': 3, 'domain': 7}
    >>> mix = build_mixture({"a": torch.zeros(8, 4, dtype=torch.long), "b": torch.ones(8, 4, dtype=torch.long)},
    ...                     None, num_samples=6, seqlen=4, seed=0)
    >>> mix.tokens[:, 0].tolist(), [(s.name, s.start, s.stop) for s in mix.sources]
    ([0, 0, 0, 1, 1, 1], [('a', 0, 3), ('b', 3, 6)])
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CalibrationError, ConfigError
from .calibration import build_calibration

GENERAL, DOMAIN = "general", "domain"

__all__ = ["CalibrationMix", "SourceRows", "active_mix", "allocate_samples", "batch_tags", "build_mixture",
           "check_source_config", "combine_second_moments", "dual_batch_size", "first_rows", "normalised_weights",
           "use_mix"]


@dataclass(frozen=True)
class SourceRows:
    """Rows ``[start, stop)`` of the calibration tensor that came from source ``name``."""

    name: str
    start: int
    stop: int

    @property
    def samples(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class CalibrationMix:
    """A mixture's token ids ``[samples, seqlen]``, the rows of each source, and the dual-importance settings."""

    tokens: torch.Tensor
    sources: tuple[SourceRows, ...]
    domain_source: str | None = None
    domain_weight: float | None = None

    @property
    def dual(self) -> bool:
        return self.domain_weight is not None

    def side(self, row: int) -> str:
        """``"domain"`` for a row of the domain source, else ``"general"``."""
        for s in self.sources:
            if s.start <= row < s.stop:
                return DOMAIN if s.name == self.domain_source else GENERAL
        raise IndexError(row)

    def general_rows(self) -> int:
        """Number of rows before the domain source (the domain source is always last in a dual mixture)."""
        return sum(s.samples for s in self.sources if s.name != self.domain_source)

    def summary(self) -> list[dict[str, Any]]:
        """One entry per source for reports: name, samples, tokens, share, and its side under dual importance."""
        total = max(sum(s.samples for s in self.sources), 1)
        out = []
        for s in self.sources:
            row: dict[str, Any] = {"name": s.name, "samples": s.samples, "tokens": s.samples * self.tokens.shape[1],
                                   "share": round(s.samples / total, 4)}
            if self.dual:
                row["side"] = DOMAIN if s.name == self.domain_source else GENERAL
                row["weight"] = float(self.domain_weight) if s.name == self.domain_source else 1.0  # type: ignore[arg-type]
            out.append(row)
        return out


def normalised_weights(names: list[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    """Each source's share (summing to 1) from ``calibration_weights`` (equal shares when ``None``)."""
    if weights is None:
        return {n: 1.0 / len(names) for n in names}
    unknown = [k for k in weights if k not in names]
    if unknown:
        raise CalibrationError(f"calibration_weights names {unknown}, which are not calibration sources; the sources "
                               f"are {names}")
    values = {n: weights.get(n, 0.0) for n in names}
    total = sum(values.values())
    if not total > 0:
        raise CalibrationError(f"calibration_weights={dict(weights)} sum to {total}; they must sum to a positive "
                               "number (each weight >= 0)")
    return {n: v / total for n, v in values.items()}


def allocate_samples(shares: Mapping[str, float], total: int) -> dict[str, int]:
    """Split ``total`` samples by ``shares`` (largest remainder, ties to the earlier name); every source with a
    positive share gets at least one sample when ``total`` allows."""
    norm = sum(shares.values())
    exact = {n: total * w / norm for n, w in shares.items()}
    counts = {n: math.floor(v) for n, v in exact.items()}
    order = sorted(shares, key=lambda n: (-(exact[n] - counts[n]), list(shares).index(n)))
    for n in order[: total - sum(counts.values())]:
        counts[n] += 1
    for n in shares:  # a positive share never rounds to nothing while another source has samples to spare
        if shares[n] > 0 and counts[n] == 0:
            donor = max(counts, key=lambda m: counts[m])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[n] += 1
    return counts


def check_source_config(names: list[str] | None, weights: Mapping[str, float] | None, domain_weight: float | None,
                        domain_source: str) -> None:
    """The checks that need the calibration's source names (``None``: calibration is a single source)."""
    if names is None:
        if weights is not None:
            raise CalibrationError("calibration_weights needs named calibration sources: pass calibration="
                                   "{'general': ..., 'domain': ...} (a dict of sources)")
        if domain_weight is not None:
            raise CalibrationError(f"domain_weight needs a calibration source named {domain_source!r}: pass "
                                   f"calibration={{'general': ..., {domain_source!r}: ...}}")
        return
    if not names:
        raise CalibrationError("calibration is an empty dict: give at least one named source")
    for n in names:
        if not isinstance(n, str) or not n:
            raise CalibrationError(f"calibration source names must be non-empty strings, got {n!r}")
    normalised_weights(names, weights)
    if domain_weight is not None:
        if domain_source not in names:
            raise CalibrationError(f"domain_weight={domain_weight} needs a calibration source named {domain_source!r} "
                                   f"(domain_source); the sources are {names}")
        if len(names) < 2:
            raise CalibrationError(f"domain_weight needs a general source besides {domain_source!r}: dual importance "
                                   "combines the general statistics with the domain's")


def build_mixture(calibration: Mapping[str, Any], tokenizer: Any, num_samples: int, seqlen: int, seed: int,
                  weights: Mapping[str, float] | None = None, domain_source: str | None = None,
                  domain_weight: float | None = None) -> CalibrationMix:
    """Draw ``num_samples`` windows from named sources (see the module docstring). Under dual importance the
    domain source goes last, so the general rows form one contiguous run."""
    names = list(calibration)
    check_source_config(names, weights, domain_weight, domain_source or DOMAIN)
    shares = normalised_weights(names, weights)
    if domain_weight is not None:
        if shares[domain_source] == 0 or all(shares[n] == 0 for n in names if n != domain_source):  # type: ignore[index]
            raise CalibrationError("domain_weight needs samples from both the general and the domain sources; "
                                   "calibration_weights gives one side a zero share")
        names = [n for n in names if n != domain_source] + [domain_source]  # type: ignore[list-item]
    counts = allocate_samples({n: shares[n] for n in names}, num_samples)
    if domain_weight is not None and (counts[domain_source] == 0 or counts[domain_source] == num_samples):  # type: ignore[index]
        raise CalibrationError(f"num_calibration_samples={num_samples} is too few for domain_weight: dual importance "
                               "needs at least one sample from the general sources and one from the domain source")
    parts, rows, start = [], [], 0
    for position, name in enumerate(list(calibration)):
        if name not in counts or counts[name] == 0:
            continue
        try:
            ids = build_calibration(calibration[name], tokenizer, counts[name], seqlen, seed + position)
        except CalibrationError as exc:
            raise CalibrationError(f"calibration source {name!r}: {exc}") from None
        parts.append((name, ids))
    parts.sort(key=lambda p: names.index(p[0]))
    widths = {name: ids.shape[1] for name, ids in parts}
    if len(set(widths.values())) > 1:
        raise CalibrationError(f"calibration sources have different sequence lengths {widths}; token tensors must "
                               f"all have seqlen={seqlen} columns (or pass text, which is cut to seqlen)")
    for name, ids in parts:
        if ids.shape[0] < counts[name]:
            raise CalibrationError(f"calibration source {name!r} has {ids.shape[0]} samples, fewer than its share "
                                   f"of {counts[name]}; give it more rows or lower num_calibration_samples")
        rows.append(SourceRows(name, start, start + ids.shape[0]))
        start += ids.shape[0]
    tokens = torch.cat([ids for _, ids in parts])
    return CalibrationMix(tokens, tuple(rows), domain_source if domain_weight is not None else None, domain_weight)


def dual_batch_size(mix: CalibrationMix, batch_size: int) -> int:
    """``batch_size`` itself, or under dual importance its largest divisor that also divides the number of general
    rows, so that no batch straddles the general/domain boundary."""
    return math.gcd(batch_size, mix.general_rows()) if mix.dual else batch_size


def combine_second_moments(general: torch.Tensor, n_general: int, domain: torch.Tensor, n_domain: int,
                           domain_weight: float, total: int) -> torch.Tensor:
    """``total · (Ĝ + λ D̂) / (1 + λ)`` for summed second moments (a vector ``Σ x²`` or a matrix ``Σ x xᵀ``) of the
    general and domain tokens, where ``Ĝ = G / (n_G · scale(G))`` is the per-token mean divided by its mean
    diagonal (likewise ``D̂``): a sum over ``total`` tokens that downstream code normalises as usual.

    Example:
        >>> g, d = torch.tensor([2.0, 2.0]), torch.tensor([30.0, 10.0])   # two tokens each
        >>> combine_second_moments(g, 2, d, 2, 1.0, 4).tolist()            # (1,1) and (1.5,0.5), averaged, x4
        [5.0, 3.0]
    """

    def unit(s: torch.Tensor, n: int) -> torch.Tensor:
        mean = s.double() / max(n, 1)
        diag = mean if mean.dim() == 1 else torch.diagonal(mean)
        scale = float(diag.mean())
        return mean / scale if scale > 0 else mean

    lam = float(domain_weight)
    out = (unit(general, n_general) + lam * unit(domain, n_domain)) * (total / (1.0 + lam))
    return out.to(general.dtype)


_ACTIVE: ContextVar[CalibrationMix | None] = ContextVar("hf_prune_calibration_mix", default=None)


@contextmanager
def use_mix(mix: CalibrationMix | None) -> Iterator[None]:
    """Make ``mix`` the calibration the statistics collectors of this run see (`active_mix`)."""
    token = _ACTIVE.set(mix)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mix(calibration: torch.Tensor | None = None, dual_only: bool = True) -> CalibrationMix | None:
    """The dual-importance mixture of the running prune (any named-source mixture with ``dual_only=False``), or
    ``None``. With ``calibration``, only when it holds the mixture's rows (a method that samples its own data
    gets ``None``)."""
    mix = _ACTIVE.get()
    if mix is None or (dual_only and not mix.dual):
        return None
    if calibration is not None and (calibration.shape != mix.tokens.shape or not torch.equal(calibration.cpu(),
                                                                                           mix.tokens.cpu())):
        return None
    return mix


def first_rows(calibration: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` rows for a quick pass (OWL's search, FinerCut): the first ``k``, or under a named-source mixture the
    first rows of every source in proportion to its share (the mixture is stored source after source, so its
    first rows would all come from one source).

    Example:
        >>> first_rows(torch.arange(6).unsqueeze(1), 2).flatten().tolist()
        [0, 1]
    """
    mix = active_mix(calibration, dual_only=False)
    if mix is None or k >= calibration.shape[0]:
        return calibration[:k]
    counts = allocate_samples({s.name: s.samples for s in mix.sources}, k)
    rows = [r for s in mix.sources for r in range(s.start, s.start + min(counts[s.name], s.samples))]
    return calibration[torch.tensor(rows, dtype=torch.long)]


def batch_tags(mix: CalibrationMix, rows: torch.Tensor, batch_size: int) -> list[str]:
    """The side (``"general"``/``"domain"``) of each batch of ``rows`` (indices into the mixture, e.g. this
    process's share) in batches of ``batch_size``; refuses a batch that straddles the boundary."""
    tags = []
    for batch in rows.split(batch_size):
        sides = {mix.side(int(r)) for r in batch.tolist()}
        if len(sides) != 1:
            raise ConfigError(f"a calibration batch mixes general and domain rows (batch_size={batch_size}); use a "
                              f"batch_size dividing {mix.general_rows()}")
        tags.append(sides.pop())
    return tags
