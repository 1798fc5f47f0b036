#!/usr/bin/env python
"""CPU inference speed of a causal LM: prefill tokens/s and batch-1 greedy decode tokens/s.

    python benchmarks/speed.py MODEL_DIR                    # prints a JSON dict (dtype: DEFAULT_DTYPE)
    python benchmarks/speed.py MODEL_DIR --dtype fp32 --runs 7 --decode-tokens 64
    python benchmarks/speed.py MODEL_DIR --compare-dtypes   # bf16 and fp32 side by side (how DEFAULT_DTYPE was chosen)
    python benchmarks/speed.py DENSE_DIR PRUNED_DIR ... --runs 7   # interleaved rounds, speedups against DENSE_DIR

From Python: ``measure_speed(model)`` times the model as it is (its dtype, the current torch thread count), so the
same function serves any model that ``model(input_ids)`` and ``model.generate`` accept, including pruned models whose
blocks have different shapes. ``measure_interleaved({name: model}, reference)`` compares models: each round times
every model once (order rotated per round) and speedups are per-round ratios against the reference, so drift of a
shared machine cancels instead of landing on whichever model was timed last.

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
import datetime
import inspect
import json
import platform
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_prune.core.compat import cache_kwarg, output_cache

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


class _Runner:
    """One model prepared for timing: its inputs and kwargs, and one timed run of each measurement."""

    def __init__(self, model: nn.Module, *, prefill_tokens: int, decode_tokens: int, decode_prompt_tokens: int,
                 seed: int) -> None:
        self.model = model
        self.device, self.dtype = _param_device_dtype(model)
        self.prefill_kwargs: dict[str, Any] = {"use_cache": True}
        if _accepts(model, "logits_to_keep"):
            self.prefill_kwargs["logits_to_keep"] = 1
        self.prefill_tokens, self.decode_tokens = prefill_tokens, decode_tokens
        self.ids = _random_ids(model, prefill_tokens, seed, self.device)
        self.prompt = _random_ids(model, decode_prompt_tokens, seed + 1, self.device)
        gen_cfg = getattr(model, "generation_config", None)
        pad = getattr(gen_cfg, "pad_token_id", None)
        if pad is None:
            eos = getattr(gen_cfg, "eos_token_id", None)
            pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        self.new = decode_tokens + 1
        self.gen_kwargs: dict[str, Any] = {
            "max_new_tokens": self.new, "min_new_tokens": self.new, "do_sample": False, "num_beams": 1,
            "use_cache": True, "pad_token_id": pad, "attention_mask": torch.ones_like(self.prompt),
            # the model's own generation_config may carry sampling knobs; greedy ignores them, so silence the warning
            "temperature": None, "top_p": None, "top_k": None,
        }

    def prefill(self) -> float:
        """Seconds for one forward of ``[1, prefill_tokens]`` with the cache built, last logits only."""
        t0 = time.perf_counter()
        out = self.model(input_ids=self.ids, **self.prefill_kwargs)
        dt = time.perf_counter() - t0
        del out
        return dt

    def generate(self) -> float:
        """Seconds for ``decode_tokens`` greedy decode steps of ``generate`` (the prompt forward excluded)."""
        clock = _StepClock()
        out = self.model.generate(self.prompt, logits_processor=[clock], **self.gen_kwargs)
        produced = int(out.shape[1] - self.prompt.shape[1])
        if produced != self.new or len(clock.stamps) != self.new:
            raise RuntimeError(f"generate produced {produced} tokens / {len(clock.stamps)} steps, expected {self.new}")
        return clock.stamps[-1] - clock.stamps[0]

    def loop(self) -> float:
        """Seconds for ``decode_tokens`` bare one-token forwards with the KV cache, each followed by an argmax."""
        out = self.model(input_ids=self.prompt, **self.prefill_kwargs)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(self.decode_tokens):
            out = self.model(input_ids=nxt, use_cache=True, **{cache_kwarg(self.model): output_cache(out)})
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        dt = time.perf_counter() - t0
        del out
        return dt

    def once(self) -> dict[str, float]:
        return {"prefill": self.prefill(), "decode": self.generate(), "decode_loop": self.loop()}


_TOKS = {"prefill": "prefill_tok_s", "decode": "decode_tok_s", "decode_loop": "decode_loop_tok_s"}


def _summarise(runner: _Runner, seconds: dict[str, list[float]]) -> dict[str, Any]:
    n = {"prefill": runner.prefill_tokens, "decode": runner.decode_tokens, "decode_loop": runner.decode_tokens}
    out: dict[str, Any] = {}
    for kind, key in _TOKS.items():
        out[key] = n[kind] / _median(seconds[kind])
        out[f"{key}_runs"] = [n[kind] / s for s in seconds[kind]]
    out["prefill_s_runs"], out["decode_s_runs"] = seconds["prefill"], seconds["decode"]
    out.update({
        "dtype": str(runner.dtype).replace("torch.", ""),
        "device": str(runner.device),
        "threads": torch.get_num_threads(),
        "attn_implementation": getattr(getattr(runner.model, "config", None), "_attn_implementation", None),
        "params": sum(p.numel() for p in runner.model.parameters()),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}",
    })
    return out


def _settings(runner: _Runner, runs: int, warmup: int, seed: int, statistic: str) -> dict[str, Any]:
    return {
        "prefill_tokens": runner.prefill_tokens,
        "prefill_kwargs": dict(runner.prefill_kwargs),
        "decode_tokens": runner.decode_tokens,
        "decode_prompt_tokens": int(runner.prompt.shape[1]),
        "decode": "greedy generate, batch 1, KV cache, min_new_tokens=max_new_tokens=decode_tokens+1, "
                  "timed from the end of the prompt forward to the end of the last decode step",
        "decode_loop": "decode_tokens forwards of one token with the KV cache, each followed by a greedy argmax, "
                       "no generate() bookkeeping (logits processors, stopping criteria, input/mask growth)",
        "runs": runs,
        "warmup": warmup,
        "statistic": statistic,
        "seed": seed,
    }


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
    ``threads`` is given). Returns medians (``prefill_tok_s``, ``decode_tok_s``, ``decode_loop_tok_s``), every raw
    run and the settings. To compare models, prefer `measure_interleaved`: one model timed after another drifts."""
    if threads is not None:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    runner = _Runner(model, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                     decode_prompt_tokens=decode_prompt_tokens, seed=seed)
    seconds: dict[str, list[float]] = {kind: [] for kind in _TOKS}
    for kind, fn in (("prefill", runner.prefill), ("decode", runner.generate), ("decode_loop", runner.loop)):
        for i in range(warmup + runs):
            dt = fn()
            if i >= warmup:
                seconds[kind].append(dt)
    if was_training:
        model.train()
    return {**_summarise(runner, seconds), "settings": _settings(runner, runs, warmup, seed, "median")}


@torch.inference_mode()
def measure_interleaved(
    models: Mapping[str, nn.Module],
    reference: str,
    *,
    rounds: int = 7,
    prefill_tokens: int = 512,
    decode_tokens: int = 64,
    decode_prompt_tokens: int = 32,
    warmup: int = 1,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Time several models in interleaved rounds, so that slow drift of the machine (other load, clocks, thermals)
    hits every model alike instead of whichever was timed last.

    Every round times each model once (prefill, generate decode, bare decode loop), in an order rotated by one
    position per round. Each model's speedup is computed **within a round** against ``reference`` and the median
    over rounds is reported (``*_x``), together with every round's ratio (``*_x_runs``); the tok/s medians and raw
    runs are reported as in `measure_speed`. ``warmup`` untimed rounds come first.
    """
    if reference not in models:
        raise ValueError(f"reference={reference!r} is not one of the models ({', '.join(models)})")
    runners = {}
    for name, model in models.items():
        model.eval()
        runners[name] = _Runner(model, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                                decode_prompt_tokens=decode_prompt_tokens, seed=seed)
    names = list(models)
    seconds = {name: {kind: [] for kind in _TOKS} for name in names}
    total = (warmup + rounds) * len(names)
    from tqdm.auto import tqdm  # a dependency of transformers

    bar = tqdm(total=total, desc="interleaved timing", unit="model", disable=not show_progress)
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            one = runners[name].once()
            if r >= warmup:
                for kind, dt in one.items():
                    seconds[name][kind].append(dt)
            bar.update(1)
    bar.close()
    out: dict[str, dict[str, Any]] = {}
    ref = seconds[reference]
    for name in names:
        res = _summarise(runners[name], seconds[name])
        for kind, key in _TOKS.items():
            ratios = [r / s for r, s in zip(ref[kind], seconds[name][kind])]  # speedup = reference time / time
            res[f"{key}_x"] = _median(ratios)
            res[f"{key}_x_runs"] = ratios
        res["settings"] = _settings(runners[name], rounds, warmup, seed,
                                    f"median over {rounds} interleaved rounds (order rotated per round); speedup = "
                                    f"median of per-round ratios against {reference!r}")
        out[name] = res
    return out


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
    p.add_argument("model_dir", nargs="+", help="one checkpoint, or several: the first is the reference of an "
                   "interleaved comparison (--runs rounds)")
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
    if len(args.model_dir) > 1:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        del kw["runs"], kw["threads"]
        models = {d: load(d, args.dtype) for d in args.model_dir}
        from oneshot import command_line, machine  # shared provenance helpers (run from benchmarks/)

        result = {"machine": machine(), "date": datetime.date.today().isoformat(),
                  "command": command_line("benchmarks/speed.py"), "reference": args.model_dir[0],
                  "models": measure_interleaved(models, args.model_dir[0], rounds=args.runs, **kw)}
        print(json.dumps({d: {k: round(v, 3) for k, v in r.items() if k.endswith(("_tok_s", "_x"))}
                          for d, r in result["models"].items()}, indent=2), file=sys.stderr)
    elif args.compare_dtypes:
        result: dict[str, Any] = {}
        for name in ("bf16", "fp32"):
            model = load(args.model_dir[0], name)
            result[name] = measure_speed(model, **kw)
            del model
        result["bf16_speedup"] = {k: result["bf16"][k] / result["fp32"][k] for k in ("prefill_tok_s", "decode_tok_s")}
    else:
        result = measure_speed(load(args.model_dir[0], args.dtype), **kw)
        result["model_dir"] = str(args.model_dir[0])
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
