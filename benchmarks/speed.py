#!/usr/bin/env python
"""CPU inference speed of a causal LM: prefill tokens/s and batch-1 greedy decode tokens/s.

    python benchmarks/speed.py MODEL_DIR                    # prints a JSON dict (dtype: DEFAULT_DTYPE)
    python benchmarks/speed.py MODEL_DIR --dtype fp32 --runs 7 --decode-tokens 64
    python benchmarks/speed.py MODEL_DIR --compare-dtypes   # bf16 and fp32 side by side (how DEFAULT_DTYPE was chosen)

From Python: ``measure_speed(model)`` times the model as it is (its dtype, the current torch thread count), so the
same function serves any model that ``model(input_ids)`` and ``model.generate`` accept, including pruned models whose
blocks have different shapes.

Protocol:
* prefill: one forward of a ``[1, prefill_tokens]`` sequence of random token ids (fixed seed), with the KV cache
  built (``use_cache=True``) and only the last position's logits computed (``logits_to_keep=1`` where the model
  accepts it), as ``generate`` does for a prompt; tokens/s = prefill_tokens / seconds;
* decode: batch-1 greedy ``generate`` with the KV cache from a ``decode_prompt_tokens`` prompt, exactly
  ``decode_tokens + 1`` new tokens (``min_new_tokens = max_new_tokens``, so EOS cannot stop it early). A logits
  processor stamps the time after every forward; the first forward is the prompt's prefill, so the span from the
  first stamp to the last covers ``decode_tokens`` decode steps only (forward + greedy pick);
* decode loop (``decode_loop_tok_s``): the same decode as a bare loop, one-token forward with the KV cache and a
  greedy argmax per step and nothing else: the model's own per-token cost, without ``generate``'s per-step
  Python bookkeeping, which does not shrink with the model;
* ``warmup`` untimed runs of each, then ``runs`` timed runs; medians are reported together with every raw run.

dtype: bf16 is the default (``DEFAULT_DTYPE``), chosen with ``--compare-dtypes`` on the dense SmolLM2-135M on the
project's 2-core AMD EPYC (no AMX), 3 runs each, on a CPU shared with other work (load ~6), so only the direction
counts: bf16 / fp32 = 1.06x prefill (50.9 vs 48.3 tok/s) and 1.7x decode (3.4 vs 2.0 tok/s). bf16 was never
slower, matches ``results/precision.json`` (bf16 forward 2.3x faster than fp32) and is the dtype every perplexity
in the benchmarks is measured in.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_DTYPE = "bf16"
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class _StepClock:
    """A logits processor that records ``time.perf_counter()`` after each forward of ``generate``."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


def _param_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _random_ids(model: nn.Module, n: int, seed: int, device: torch.device) -> torch.Tensor:
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or model.get_input_embeddings().num_embeddings)
    gen = torch.Generator().manual_seed(seed)
    # Avoid the lowest ids (special tokens in most vocabularies); the content does not matter for speed.
    return torch.randint(min(100, vocab - 1), vocab, (1, n), generator=gen).to(device)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


@torch.inference_mode()
def measure_speed(
    model: nn.Module,
    *,
    prefill_tokens: int = 512,
    decode_tokens: int = 64,
    decode_prompt_tokens: int = 32,
    runs: int = 5,
    warmup: int = 1,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time prefill and batch-1 greedy decode of ``model`` as it is (dtype, device, threads unchanged unless
    ``threads`` is given). Returns medians (``prefill_tok_s``, ``decode_tok_s``), every raw run and the settings."""
    if threads is not None:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    device, dtype = _param_device_dtype(model)
    prefill_kwargs: dict[str, Any] = {"use_cache": True}
    if _accepts(model, "logits_to_keep"):
        prefill_kwargs["logits_to_keep"] = 1

    # ---- prefill: one forward of [1, prefill_tokens]
    ids = _random_ids(model, prefill_tokens, seed, device)
    prefill_s: list[float] = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        out = model(input_ids=ids, **prefill_kwargs)
        dt = time.perf_counter() - t0
        del out
        if i >= warmup:
            prefill_s.append(dt)

    # ---- decode: greedy generate, decode_tokens + 1 new tokens, time after the first (prefill) forward
    prompt = _random_ids(model, decode_prompt_tokens, seed + 1, device)
    gen_cfg = getattr(model, "generation_config", None)
    pad = getattr(gen_cfg, "pad_token_id", None)
    if pad is None:
        eos = getattr(gen_cfg, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    new = decode_tokens + 1
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "num_beams": 1, "use_cache": True,
        "pad_token_id": pad, "attention_mask": torch.ones_like(prompt),
        # the model's own generation_config may carry sampling knobs; greedy ignores them, so silence the warning
        "temperature": None, "top_p": None, "top_k": None,
    }
    decode_s: list[float] = []
    for i in range(warmup + runs):
        clock = _StepClock()
        out = model.generate(prompt, logits_processor=[clock], **gen_kwargs)
        produced = int(out.shape[1] - prompt.shape[1])
        if produced != new or len(clock.stamps) != new:
            raise RuntimeError(f"generate produced {produced} tokens / {len(clock.stamps)} steps, expected {new}")
        if i >= warmup:
            decode_s.append(clock.stamps[-1] - clock.stamps[0])

    # ---- decode without generate(): forward of one token with the KV cache + greedy argmax, nothing else
    loop_s: list[float] = []
    for i in range(warmup + runs):
        out = model(input_ids=prompt, **prefill_kwargs)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        dt = time.perf_counter() - t0
        del out
        if i >= warmup:
            loop_s.append(dt)
    if was_training:
        model.train()

    n_params = sum(p.numel() for p in model.parameters())
    return {
        "prefill_tok_s": prefill_tokens / _median(prefill_s),
        "decode_tok_s": decode_tokens / _median(decode_s),
        "prefill_s_runs": prefill_s,
        "decode_s_runs": decode_s,
        "prefill_tok_s_runs": [prefill_tokens / s for s in prefill_s],
        "decode_tok_s_runs": [decode_tokens / s for s in decode_s],
        "decode_loop_tok_s": decode_tokens / _median(loop_s),
        "decode_loop_tok_s_runs": [decode_tokens / s for s in loop_s],
        "settings": {
            "prefill_tokens": prefill_tokens,
            "prefill_kwargs": {k: v for k, v in prefill_kwargs.items()},
            "decode_tokens": decode_tokens,
            "decode_prompt_tokens": decode_prompt_tokens,
            "decode": "greedy generate, batch 1, KV cache, min_new_tokens=max_new_tokens=decode_tokens+1, "
                      "timed from the end of the prompt forward to the end of the last decode step",
            "decode_loop": "decode_tokens forwards of one token with the KV cache, each followed by a greedy argmax, "
                           "no generate() bookkeeping (logits processors, stopping criteria, input/mask growth)",
            "runs": runs,
            "warmup": warmup,
            "statistic": "median",
            "seed": seed,
        },
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "params": n_params,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


def load(model_dir: str | Path, dtype: str = DEFAULT_DTYPE) -> nn.Module:
    """Load a checkpoint for timing. hf_prune is imported when available so its loading patches (pruned / per-layer
    shaped checkpoints) are active; a plain transformers checkpoint needs nothing else."""
    try:
        import hf_prune  # noqa: F401
    except ImportError:
        pass
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=DEFAULT_DTYPE)
    p.add_argument("--compare-dtypes", action="store_true", help="measure bf16 and fp32, one after the other")
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--decode-prompt-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    kw: dict[str, Any] = {"prefill_tokens": args.prefill_tokens, "decode_tokens": args.decode_tokens,
                          "decode_prompt_tokens": args.decode_prompt_tokens, "runs": args.runs,
                          "warmup": args.warmup, "threads": args.threads}
    if args.compare_dtypes:
        result: dict[str, Any] = {}
        for name in ("bf16", "fp32"):
            model = load(args.model_dir, name)
            result[name] = measure_speed(model, **kw)
            del model
        result["bf16_speedup"] = {k: result["bf16"][k] / result["fp32"][k] for k in ("prefill_tok_s", "decode_tok_s")}
    else:
        result = measure_speed(load(args.model_dir, args.dtype), **kw)
    result["model_dir"] = str(args.model_dir)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
