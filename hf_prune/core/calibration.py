"""Any calibration source -> a LongTensor of token ids ``[num_samples, seqlen]`` (seeded, reproducible).

Accepted sources:

* a path to a text file (``.txt``; ``.json``/``.jsonl``/``.csv``/``.parquet`` or a ``save_to_disk`` folder go
  through `datasets`), a ``list[str]`` (with ``tokenizer``);
* a `datasets.Dataset` with a ``text`` column (with ``tokenizer``) or an ``input_ids`` column;
* a `torch.utils.data.DataLoader` yielding dicts with ``input_ids`` or LongTensors;
* a LongTensor ``[samples, seqlen]`` of token ids, used as is (its first ``num_samples`` rows; its own seqlen).

Text is joined with blank lines, tokenized once, and ``num_samples`` windows of ``seqlen`` tokens are
drawn at random start positions from a generator seeded with ``seed`` (the SparseGPT/Wanda protocol).

Example:
    >>> import torch
    >>> from hf_prune.core.calibration import build_calibration
    >>> build_calibration(torch.arange(40).view(4, 10), None, num_samples=2, seqlen=8, seed=0).shape
    torch.Size([2, 10])
    >>> build_calibration([torch.arange(100)], None, num_samples=3, seqlen=8, seed=0).shape
    torch.Size([3, 8])
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import CalibrationError

_DATASET_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _sample_windows(ids: torch.Tensor, num_samples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    total = ids.numel()
    if total < seqlen:
        raise CalibrationError(
            f"calibration {what} has {total} tokens, fewer than seqlen={seqlen}: provide more text, or lower "
            f"seqlen (PruningConfig.seqlen / --seqlen)"
        )
    if total < num_samples * seqlen:
        warnings.warn(
            f"calibration {what} has {total} tokens, fewer than num_samples*seqlen={num_samples * seqlen}; "
            "windows will overlap",
            stacklevel=3,
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (num_samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def tokenize_texts(texts: Sequence[str], tokenizer: Any, what: str = "calibration") -> torch.Tensor:
    """Join texts with blank lines and tokenize once, without special tokens (1-D LongTensor).

    Shared by calibration and evaluation (`hf_prune.evaluate.tokenize_for_eval`).
    """
    if tokenizer is None:
        raise CalibrationError(
            f"{what} is text, so a tokenizer is needed: pass tokenizer=AutoTokenizer.from_pretrained(...)"
        )
    joined = "\n\n".join(t for t in texts if t)
    if not joined.strip():
        hint = ": pass non-empty text (a file, a list of strings or a dataset)" if what == "calibration" else ""
        raise CalibrationError(f"{what} text is empty{hint}")
    ids = tokenizer(joined, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return ids.to(torch.long)


def _from_token_rows(rows: list[torch.Tensor], num_samples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    rows = [r.flatten().to(torch.long) for r in rows if r.numel()]
    if not rows:
        raise CalibrationError(f"calibration {what} is empty: it yielded no token ids")
    if all(r.numel() >= seqlen for r in rows) and len(rows) >= num_samples:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(rows), generator=gen)[:num_samples].tolist()
        out = []
        for i in pick:
            r = rows[i]
            start = int(torch.randint(0, r.numel() - seqlen + 1, (1,), generator=gen))
            out.append(r[start : start + seqlen])
        return torch.stack(out)
    return _sample_windows(torch.cat(rows), num_samples, seqlen, seed, what)


def _from_dataset(ds: Any, tokenizer: Any, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    columns = getattr(ds, "column_names", None) or []
    if len(ds) == 0:
        raise CalibrationError("calibration dataset is empty (0 rows)")
    if "input_ids" in columns:
        return _from_token_rows([torch.as_tensor(r) for r in ds["input_ids"]], num_samples, seqlen, seed, "dataset")
    text_col = "text" if "text" in columns else next((c for c in columns if isinstance(ds[0][c], str)), None)
    if text_col is None:
        raise CalibrationError(
            f"calibration dataset has columns {columns}; it needs an 'input_ids' column or a text column (e.g. 'text')"
        )
    return _sample_windows(tokenize_texts(ds[text_col], tokenizer), num_samples, seqlen, seed, f"dataset column {text_col!r}")


def _from_path(path: str, tokenizer: Any, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    suffix = os.path.splitext(path)[1].lower()
    if os.path.isdir(path) or suffix in _DATASET_SUFFIXES:
        try:
            import datasets
        except ImportError:
            raise CalibrationError(f"reading {path!r} needs the datasets package: pip install datasets") from None
        if os.path.isdir(path):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[next(iter(ds))]
        else:
            ds = datasets.load_dataset(_DATASET_SUFFIXES[suffix], data_files=path, split="train")
        return _from_dataset(ds, tokenizer, num_samples, seqlen, seed)
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return _sample_windows(tokenize_texts([text], tokenizer), num_samples, seqlen, seed, f"file {path!r}")


def build_calibration(
    calibration: Any, tokenizer: Any, num_samples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """Turn ``calibration`` into token ids ``[num_samples, seqlen]``; see the module docstring."""
    if calibration is None:
        raise CalibrationError(
            "this method needs calibration data: pass calibration= a text file, a list of strings (with "
            "tokenizer=), a datasets.Dataset, a DataLoader or a LongTensor [samples, seqlen]"
        )
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype not in (torch.int64, torch.int32) or calibration.dim() != 2:
            raise CalibrationError(
                f"a calibration tensor must be token ids, an integer tensor [samples, seqlen]; got dtype "
                f"{calibration.dtype} with shape {tuple(calibration.shape)}"
            )
        if calibration.numel() == 0:
            raise CalibrationError("calibration tensor is empty")
        return calibration[:num_samples].to(torch.long)
    if isinstance(calibration, (str, os.PathLike)):
        path = os.fspath(calibration)
        if not os.path.exists(path):
            raise CalibrationError(
                f"calibration={path!r} is not an existing file or folder; pass a text/json/csv/parquet file, a "
                "dataset saved with save_to_disk, or the text itself as a list of strings"
            )
        return _from_path(path, tokenizer, num_samples, seqlen, seed)
    if isinstance(calibration, (list, tuple)):
        if not calibration:
            raise CalibrationError("calibration list is empty")
        if all(isinstance(t, str) for t in calibration):
            return _sample_windows(tokenize_texts(calibration, tokenizer), num_samples, seqlen, seed, "text list")
        if all(isinstance(t, torch.Tensor) for t in calibration):
            return _from_token_rows(list(calibration), num_samples, seqlen, seed, "tensor list")
        raise CalibrationError("a calibration list must hold strings (with tokenizer=) or LongTensors of token ids")
    if isinstance(calibration, torch.utils.data.DataLoader):
        rows: list[torch.Tensor] = []
        for batch in calibration:
            ids = batch["input_ids"] if isinstance(batch, dict) else batch
            if isinstance(ids, (list, tuple)):
                ids = ids[0]
            ids = torch.as_tensor(ids)
            rows.extend(list(ids) if ids.dim() == 2 else [ids])
            if sum(r.numel() for r in rows) >= 4 * num_samples * seqlen:
                break
        return _from_token_rows(rows, num_samples, seqlen, seed, "DataLoader")
    if hasattr(calibration, "column_names") and hasattr(calibration, "__len__"):
        return _from_dataset(calibration, tokenizer, num_samples, seqlen, seed)
    raise CalibrationError(
        f"calibration of type {type(calibration).__name__} is not supported; pass a text file path, a list of "
        "strings, a datasets.Dataset, a DataLoader or a LongTensor [samples, seqlen]"
    )
