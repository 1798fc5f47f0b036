"""On-disk size of compressed sparse checkpoints vs dense, against bytes-per-weight arithmetic.

Magnitude-prunes every decoder linear of a model (50 % unstructured per row, and 2:4 per group of
4), saves it dense (``save_pretrained``), as ``bitmask`` and as ``2:4``
(``hf_prune.formats.save_sparse_pretrained``), measures the ``*.safetensors`` bytes and compares with
the prediction ``non_linear_bytes + bytes_per_weight * linear_weights``. Writes the ``disk`` rows of
``benchmarks/results/kernels.json`` (keeping any GPU ``rows`` already there).

Usage:
    python benchmarks/disk_size.py                      # tiny random Llama (bf16)
    python benchmarks/disk_size.py --model-dir PATH     # any local causal-LM checkpoint

Example:
    >>> from benchmarks.disk_size import prune_nm_, prune_unstructured_  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_prune.formats import save_sparse_pretrained  # noqa: E402
from hf_prune.nn.packing import predicted_bytes_per_weight  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"
GPU_NOTE = (
    "GPU latency rows are owed: this machine has no GPU. Run `python benchmarks/kernels_bench.py` on an "
    "H100/H200 to fill `rows`; nothing here is estimated."
)


def prune_unstructured_(w: torch.Tensor, sparsity: float) -> None:
    """Zero the ``sparsity`` fraction of smallest-|w| entries of every row (in place)."""
    k = int(round(w.shape[1] * sparsity))
    w.scatter_(1, w.float().abs().topk(k, dim=1, largest=False).indices, 0)


def prune_nm_(w: torch.Tensor, n: int = 2, m: int = 4) -> None:
    """Keep the ``n`` largest |w| of every group of ``m`` consecutive inputs (in place)."""
    g = w.view(w.shape[0], -1, m)
    g.scatter_(-1, g.float().abs().topk(m - n, dim=-1, largest=False).indices, 0)


def decoder_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """``nn.Linear`` modules inside the decoder blocks (never embeddings / lm_head)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
            out.append(mod)
    return out


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def st_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def header_bytes(folder: Path) -> int:
    """Bytes of the safetensors JSON headers (8-byte length + JSON) in a folder."""
    total = 0
    for p in folder.glob("*.safetensors"):
        with p.open("rb") as f:
            total += 8 + int.from_bytes(f.read(8), "little")
    return total


def measure(model: torch.nn.Module, label: str, workdir: Path) -> list[dict]:
    """Return one disk row per compressed format for ``model`` (a fresh copy is pruned per format)."""
    linears = decoder_linears(model)
    itemsize = linears[0].weight.element_size()
    linear_numel = sum(m.weight.numel() for m in linears)
    originals = [m.weight.detach().clone() for m in linears]
    model.save_pretrained(workdir / "dense")
    dense_bytes = st_bytes(workdir / "dense")
    dense_header = header_bytes(workdir / "dense")
    non_linear = dense_bytes - dense_header - linear_numel * itemsize  # embeddings, norms, lm_head
    rows = []
    for fmt, sparsity in (("bitmask", 0.5), ("2:4", 0.5)):
        with torch.no_grad():
            for mod, orig in zip(linears, originals):
                mod.weight.copy_(orig)
                prune_nm_(mod.weight) if fmt == "2:4" else prune_unstructured_(mod.weight, sparsity)
        out = workdir / fmt.replace(":", "_")
        save_sparse_pretrained(model, out, fmt)
        size = st_bytes(out)
        bpw = predicted_bytes_per_weight(fmt, itemsize, 1 - sparsity)
        hdr = header_bytes(out)
        predicted = dense_header + non_linear + bpw * linear_numel  # same header size as dense assumed
        rows.append(
            {
                "model": label,
                "format": fmt,
                "sparsity": sparsity,
                "dtype": str(linears[0].weight.dtype).removeprefix("torch."),
                "bytes": size,
                "dense_bytes": dense_bytes,
                "ratio": round(size / dense_bytes, 5),
                "predicted_ratio": round(predicted / dense_bytes, 5),
                "linear_weights": linear_numel,
                "bytes_per_weight_predicted": bpw,
                "header_bytes": hdr,
                "dense_header_bytes": dense_header,
                "payload_bytes_exact": size - hdr == non_linear + bpw * linear_numel,
                "linear_ratio_measured": round((size - hdr - non_linear) / (linear_numel * itemsize), 5),
                "linear_ratio_predicted": round(bpw / itemsize, 5),
            }
        )
    with torch.no_grad():
        for mod, orig in zip(linears, originals):
            mod.weight.copy_(orig)
    return rows


def write_results(disk_rows: list[dict], command: str) -> dict:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.setdefault("device", f"cpu ({platform.processor() or platform.machine()}), disk sizes only")
    data["machine"] = (f"{platform.processor() or platform.machine()}, CPU capability "
                       f"{torch.backends.cpu.get_cpu_capability()}")
    data.setdefault("rows", [])
    if not data["rows"]:
        data["note"] = GPU_NOTE
    data["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    data["command"] = command
    data["disk"] = disk_rows
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, help="local HF checkpoint (default: tiny random Llama)")
    ap.add_argument("--no-write", action="store_true", help="print only, leave kernels.json alone")
    args = ap.parse_args(argv)
    if args.model_dir:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16).eval()
        label = args.model_dir.name
    else:
        model, label = tiny_llama(), "tiny-random-llama(h512,i1536,L4,bf16)"
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(model, label, Path(tmp))
    for r in rows:
        print(
            f"{r['format']:>8} {r['bytes']:>12,d} B vs dense {r['dense_bytes']:,d} B: ratio {r['ratio']:.4f} "
            f"(predicted {r['predicted_ratio']:.4f}); linears {r['linear_ratio_measured']:.4f} "
            f"(predicted {r['linear_ratio_predicted']:.4f}); header {r['header_bytes']:,d} B "
            f"(dense {r['dense_header_bytes']:,d} B); payload matches arithmetic exactly: {r['payload_bytes_exact']}"
        )
    if not args.no_write:
        command = "python benchmarks/disk_size.py" + (
            f" --model-dir {args.model_dir}" if args.model_dir else ""
        )
        existing = json.loads(RESULTS.read_text()).get("disk", []) if RESULTS.exists() else []
        keep = [r for r in existing if r.get("model") != label]
        write_results(keep + rows, command)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
