"""Perplexity with the standard protocol (what papers call "WikiText-2 perplexity").

Texts are joined with ``"\\n\\n"``, tokenized once, cut into non-overlapping windows of ``seqlen`` tokens
(the remainder is dropped), and ``PPL = exp(total NLL / tokens predicted)``, where each window predicts its
``seqlen - 1`` next tokens. Window length moves PPL more than most method gaps: it is always reported.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_prune import perplexity
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                      num_attention_heads=4, vocab_size=100))
    >>> res = perplexity(model, torch.randint(0, 100, (400,)), seqlen=64, show_progress=False)
    >>> res.windows, res.tokens
    (6, 378)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .core.calibration import tokenize_texts
from .core.model import input_device
from .errors import CalibrationError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenize_for_eval(text: str | Sequence[str], tokenizer: Any) -> torch.Tensor:
    """Join texts with blank lines and tokenize once (1-D LongTensor)."""
    return tokenize_texts([text] if isinstance(text, str) else list(text), tokenizer, what="evaluation")


@torch.no_grad()
def perplexity(
    model: nn.Module,
    data: str | Sequence[str] | torch.Tensor,
    tokenizer: Any = None,
    seqlen: int = 512,
    batch_size: int = 8,
    max_windows: int | None = None,
    show_progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``data`` (text with ``tokenizer``, or a 1-D tensor of token ids)."""
    import time

    from tqdm.auto import tqdm

    ids = data.flatten() if isinstance(data, torch.Tensor) else tokenize_for_eval(data, tokenizer)
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise CalibrationError(f"evaluation data has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    device = input_device(model)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    try:
        for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not show_progress, unit="batch"):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            for row in range(batch.shape[0]):  # fp32 log-softmax one sequence at a time bounds memory
                lg = logits[row, :-1].float()
                nll = nn.functional.cross_entropy(lg, batch[row, 1:].to(lg.device), reduction="sum")
                total_nll += float(nll)
                total_tokens += seqlen - 1
            del logits
    finally:
        model.train(was_training)
    nll = total_nll / total_tokens
    return PerplexityResult(math.exp(nll), nll, total_tokens, n_windows, seqlen, time.perf_counter() - start)


LM_EVAL_INSTALL = 'pip install "hf_prune[eval]"'


def lm_eval_scores(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | float | None = None,
    include_path: str | Sequence[str] | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness tasks in-process on ``model`` (already loaded, e.g. pruned) and return
    ``{task: {metric: value}}`` (lm_eval's metric keys, e.g. ``"acc,none"``, with their ``_stderr`` values).

    Needs ``lm_eval`` 0.4.x (``pip install "hf_prune[eval]"``), imported only here. ``include_path``: folder(s)
    of extra task YAML files (local tasks; lm_eval's own tasks stay available); ``limit``: examples per task (an
    int) or a fraction. Nothing is cached or logged to disk by lm_eval.

    Example:
        >>> # lm_eval_scores(model, tokenizer, ["hellaswag"], limit=100)  # -> {"hellaswag": {"acc,none": ...}}
        >>> LM_EVAL_INSTALL
        'pip install "hf_prune[eval]"'
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError(f"lm-evaluation-harness is not installed ({exc}); run: {LM_EVAL_INSTALL}") from exc

    paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
    manager = TaskManager(include_path=paths or None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(input_device(model)))
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                  task_manager=manager, log_samples=False, bootstrap_iters=0)
    results = (out or {}).get("results", {})
    return {task: {k: float(v) for k, v in metrics.items()
                   if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, metrics in results.items()}
