"""Compressed sparse checkpoints: packing math, save/from_pretrained round trips on tiny real
models, on-disk size vs bytes-per-weight arithmetic, stock-transformers behaviour, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import hf_prune.formats as hpf
from hf_prune.formats.quantizer import QUANT_METHOD, SENTINEL_KEY
from hf_prune.nn import SparseLinear
from hf_prune.nn.packing import (
    index_bits,
    is_nm_sparse,
    pack_bitmask,
    pack_nm,
    parse_format,
    predicted_bytes_per_weight,
    tensor_nbytes,
    unpack_bitmask,
    unpack_nm,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact comparison (distinguishes what ``torch.equal`` would not, e.g. NaN payloads)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(_INT_VIEW[a.dtype]), b.view(_INT_VIEW[b.dtype]))
    )


def random_sparse(shape: tuple[int, int], sparsity: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    w[torch.rand(shape, generator=g) < sparsity] = 0
    return w


def nm_prune_(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest |w| of every group of m (in place)."""
    g = w.view(w.shape[0], -1, m)
    drop = g.float().abs().topk(m - n, dim=-1, largest=False).indices
    g.scatter_(-1, drop, 0)
    return w


def unstructured_prune_(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the smallest |w| of every row (in place)."""
    k = int(w.shape[1] * sparsity)
    drop = w.float().abs().topk(k, dim=-1, largest=False).indices
    w.scatter_(-1, drop, 0)
    return w


# ------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 13), (16, 64), (7, 200)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_bitmask_roundtrip_bit_exact(dtype, shape, sparsity):
    w = random_sparse(shape, sparsity, dtype)
    mask, values = pack_bitmask(w)
    assert mask.dtype == torch.uint8 and mask.shape == (shape[0], (shape[1] + 7) // 8)
    assert values.numel() == int((w != 0).sum())
    assert bits_equal(unpack_bitmask(mask, values, w.shape), w)
    assert tensor_nbytes(mask, values) == mask.numel() + values.numel() * w.element_size()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (2, 8), (4, 8), (1, 2), (3, 6), (8, 16)])
def test_nm_roundtrip_bit_exact(dtype, nm):
    n, m = nm
    w = nm_prune_(torch.randn(12, m * 5).to(dtype), n, m)
    w[0] = 0  # groups with fewer than n non-zeros
    w[1, :m] = 0
    values, idx = pack_nm(w, n, m)
    assert values.shape == (12, m * 5 // m * n)
    assert bits_equal(unpack_nm(values, idx, w.shape, n, m), w)
    per = 8 // index_bits(m)
    assert idx.shape == (12, -(-values.shape[1] // per))


def test_2_4_bytes_per_weight_matches_table():
    # references.md: 2:4 bf16 = 1.125 bytes/weight, bitmask bf16 = 1.125 / 0.725 / 0.325 at 50/70/90 %
    w = nm_prune_(torch.randn(64, 256, dtype=torch.bfloat16), 2, 4)
    values, idx = pack_nm(w, 2, 4)
    assert tensor_nbytes(values, idx) / w.numel() == 1.125 == predicted_bytes_per_weight("2:4", 2)
    for s, bpw in [(0.5, 1.125), (0.7, 0.725), (0.9, 0.325)]:
        assert predicted_bytes_per_weight("bitmask", 2, 1 - s) == pytest.approx(bpw)
        w = unstructured_prune_(torch.randn(64, 200, dtype=torch.bfloat16), s)
        mask, vals = pack_bitmask(w)
        assert tensor_nbytes(mask, vals) / w.numel() == pytest.approx(
            predicted_bytes_per_weight("bitmask", 2, vals.numel() / w.numel())
        )


def test_pack_nm_rejects_non_nm_mask():
    w = random_sparse((8, 16), 0.5, torch.float32)
    assert not is_nm_sparse(w, 2, 4)
    with pytest.raises(ValueError, match=r"not 2:4 sparse: \d+ of 32 groups"):
        pack_nm(w, 2, 4)
    with pytest.raises(ValueError, match="divisible by 4"):
        pack_nm(torch.zeros(2, 6), 2, 4)


@pytest.mark.parametrize("bad", ["2:2", "0:4", "4:2", "csr", "2:4:8", "", "1:300"])
def test_parse_format_errors(bad):
    with pytest.raises(ValueError, match="sparse_format"):
        parse_format(bad)


def test_unpack_rejects_corrupt_tensors():
    w = random_sparse((4, 20), 0.5, torch.float32)
    mask, values = pack_bitmask(w)
    with pytest.raises(ValueError, match="values are stored"):
        unpack_bitmask(mask, values[:-1], w.shape)  # truncated values
    with pytest.raises(ValueError, match="bitmask must be uint8 of shape"):
        unpack_bitmask(mask[:, :-1], values, w.shape)  # truncated bitmask
    with pytest.raises(ValueError, match="bitmask must be uint8 of shape"):
        unpack_bitmask(mask, values, (4, 40))  # shape metadata wrong
    padded = mask.clone()
    padded[0, -1] |= 0x80  # bit 23 of a 20-column row
    with pytest.raises(ValueError, match="beyond in_features"):
        unpack_bitmask(padded, values, w.shape)

    w = nm_prune_(torch.randn(4, 16), 2, 4)
    values, idx = pack_nm(w, 2, 4)
    with pytest.raises(ValueError, match="values must have shape"):
        unpack_nm(values[:, :-2], idx, w.shape, 2, 4)
    with pytest.raises(ValueError, match="indices must be uint8"):
        unpack_nm(values, idx[:-1], w.shape, 2, 4)
    dup = idx.clone()
    dup[0, 0] = 0  # both kept entries of the first groups claim position 0
    with pytest.raises(ValueError, match="not increasing"):
        unpack_nm(values, dup, w.shape, 2, 4)


# ------------------------------------------------------------------------------ tiny models


def tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_opt(dtype: torch.dtype = torch.float32) -> OPTForCausalLM:
    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=128,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=64,
    )
    return OPTForCausalLM(cfg).to(dtype).eval()


def prune_model_(model: torch.nn.Module, fmt: str) -> torch.nn.Module:
    """Magnitude-prune every decoder linear: 2:4/N:M per group, or 50 % per row ("bitmask")."""
    with torch.no_grad():
        for mod in (
            model.model.decoder.layers.modules()
            if hasattr(model.model, "decoder")
            else model.model.layers.modules()
        ):
            if isinstance(mod, torch.nn.Linear):
                if fmt == "bitmask":
                    unstructured_prune_(mod.weight, 0.5)
                else:
                    n, m = map(int, fmt.split(":"))
                    nm_prune_(mod.weight, n, m)
    return model


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def sparse_modules(model: torch.nn.Module) -> dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


@pytest.mark.parametrize(
    "fmt,dtype,builder",
    [
        ("2:4", torch.float32, tiny_llama),
        ("2:4", torch.bfloat16, tiny_llama),
        ("bitmask", torch.bfloat16, tiny_llama),
        ("bitmask", torch.float16, tiny_llama),
        ("4:8", torch.float32, tiny_llama),
        ("bitmask", torch.float32, tiny_opt),  # linears with bias
    ],
)
def test_model_roundtrip_bit_exact(tmp_path, fmt, dtype, builder):
    model = prune_model_(builder(dtype), fmt)
    dense_sd = {k: v.clone() for k, v in model.state_dict().items()}
    # reference logits: the same model through a plain dense save/load (a model cast with .to(bf16)
    # differs from a loaded one in its rotary buffers, so compare like with like)
    model.save_pretrained(tmp_path / "dense")
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=dtype)(IDS).logits

    report = hpf.save_sparse_pretrained(model, tmp_path / "ckpt", fmt)
    # the user's model is left untouched
    assert not sparse_modules(model) and getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    layers = model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers
    assert len(report["modules"]) == sum(isinstance(m, torch.nn.Linear) for m in layers.modules())

    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (
        qc["quant_method"] == QUANT_METHOD
        and qc["sparse_format"] == fmt
        and "pip install hf_prune" in qc["requires"]
    )

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=dtype)
    mods = sparse_modules(loaded)
    assert set(mods) == set(report["modules"])
    for name, mod in mods.items():
        assert str(mod.format) == fmt
        assert bits_equal(mod.dense_weight(), dense_sd[f"{name}.weight"])
        if mod.bias is not None:
            assert bits_equal(mod.bias.detach(), dense_sd[f"{name}.bias"])
    for key, val in loaded.state_dict().items():  # everything else identical too
        if key in dense_sd:
            assert bits_equal(val, dense_sd[key]), key
    with torch.no_grad():
        out = loaded(IDS).logits
    assert torch.equal(out, logits)
    # CPU default policy: decompressed once at load, the dense model's forward
    assert {m.last_path for m in mods.values()} == {"decompressed"} and {m.policy for m in mods.values()} == {"speed"}


def test_disk_size_matches_arithmetic(tmp_path):
    model = prune_model_(tiny_llama(torch.bfloat16), "2:4")
    model.save_pretrained(tmp_path / "dense")
    hpf.save_sparse_pretrained(model, tmp_path / "s24", "2:4")
    bm = prune_model_(tiny_llama(torch.bfloat16), "bitmask")  # exactly 50 % per row
    hpf.save_sparse_pretrained(bm, tmp_path / "bm", "bitmask")

    linear_numel = sum(
        m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)
    )
    sizes = {}
    for name, bpw in [("dense", 2.0), ("s24", 1.125), ("bm", 1.125)]:
        path = tmp_path / name / "model.safetensors"
        with safe_open(path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        payload = sum(t.numel() * t.element_size() for t in tensors.values())
        header = int.from_bytes(path.read_bytes()[:8], "little") + 8
        sizes[name] = os.path.getsize(path)
        assert sizes[name] == payload + header  # nothing else in the file
        linear_bytes = sum(
            t.numel() * t.element_size()
            for k, t in tensors.items()
            if ".layers." in k and "_proj.weight" in k
        )
        assert linear_bytes == bpw * linear_numel  # exact bytes-per-weight arithmetic
        non_linear = payload - linear_bytes
        if name == "dense":
            dense_non_linear = non_linear
        else:
            assert non_linear == dense_non_linear  # embeddings, norms, lm_head unchanged
    assert sizes["s24"] < sizes["dense"] and sizes["bm"] < sizes["dense"]


def test_resave_loaded_and_dequantize(tmp_path):
    model = prune_model_(tiny_llama(), "2:4")
    with torch.no_grad():
        logits = model(IDS).logits
    hpf.save_sparse_pretrained(model, tmp_path / "a", "2:4")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")  # plain save of a loaded compressed model stays compressed
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert len(sparse_modules(again)) == 14
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, logits)
    # re-compress a loaded model into another format
    hpf.save_sparse_pretrained(loaded, tmp_path / "c", "bitmask")
    assert (
        json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]["sparse_format"]
        == "bitmask"
    )
    # back to dense nn.Linear; a dense save then loads with the plain (non-quantized) path
    dense = again.dequantize()
    assert not sparse_modules(dense) and getattr(dense.config, "quantization_config", None) is None
    with torch.no_grad():
        assert torch.equal(dense(IDS).logits, logits)
    dense.save_pretrained(tmp_path / "d")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert not sparse_modules(plain)
    with torch.no_grad():
        assert torch.equal(plain(IDS).logits, logits)


@pytest.mark.parametrize("fmt", ["2:4", "bitmask"])
def test_load_policy_is_chosen_per_model_at_load(tmp_path, fmt, caplog):
    """``quantization_config=HfPruneSparseConfig(policy=...)`` at ``from_pretrained`` picks what the layers hold;
    no global; every policy gives the same logits, re-saves to the same files, and never reaches config.json."""
    import logging

    from hf_prune.formats import HfPruneSparseConfig

    model = prune_model_(tiny_llama(), fmt)
    with torch.no_grad():
        logits = model(IDS).logits
    hpf.save_sparse_pretrained(model, tmp_path / "ckpt", fmt)
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    held = {}
    for policy in ("speed", "memory", "kernel", "auto"):
        with caplog.at_level(logging.INFO, logger="hf_prune.nn"):
            caplog.clear()
            m = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt",
                                                     quantization_config=HfPruneSparseConfig(policy=policy))
        msg = "\n".join(r.getMessage() for r in caplog.records if r.name == "hf_prune.nn")
        mods = sparse_modules(m)
        want = {"auto": "speed"}.get(policy, policy)  # auto on CPU = speed
        got = {x.policy for x in mods.values()}
        assert got <= ({"kernel", "speed"} if policy == "kernel" else {want}), (policy, got)
        assert f"policy={policy!r}" in msg and "MiB" in msg and f"policy={next(iter(got))}" in repr(m)
        held[policy] = sum(x.held_nbytes() for x in mods.values())
        with torch.no_grad():
            out = m(IDS).logits
        if policy == "kernel":
            torch.testing.assert_close(out, logits, rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(out, logits), policy
        m.save_pretrained(tmp_path / policy)  # saving again re-compresses to the same tensors
        again = load_file(tmp_path / policy / "model.safetensors")
        assert set(again) == set(saved) and all(torch.equal(again[k], saved[k]) for k in saved), policy
        assert "policy" not in json.loads((tmp_path / policy / "config.json").read_text())["quantization_config"]
    assert held["memory"] < held["speed"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert {x.policy for x in sparse_modules(plain).values()} == {"speed"}  # the CPU default


def test_bad_policy_is_refused_before_loading(tmp_path):
    from hf_prune.formats import HfPruneSparseConfig

    with pytest.raises(ValueError, match=r"policy='fastest'.*'speed', 'memory', 'kernel'"):
        HfPruneSparseConfig(policy="fastest")


def test_kernel_policy_without_a_kernel_falls_back_to_speed_with_a_warning(tmp_path, caplog):
    """bf16 weights on CPU: no CSR product runs bf16 natively, so ``kernel`` falls back to ``speed`` and says so."""
    import logging

    from hf_prune.formats import HfPruneSparseConfig

    model = prune_model_(tiny_llama(torch.bfloat16), "bitmask")
    hpf.save_sparse_pretrained(model, tmp_path / "ckpt", "bitmask")
    with caplog.at_level(logging.WARNING, logger="hf_prune.nn"):
        m = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16,
                                                 quantization_config=HfPruneSparseConfig(policy="kernel"))
    assert {x.policy for x in sparse_modules(m).values()} == {"speed"}
    assert any("fell back to 'speed'" in r.getMessage() for r in caplog.records)


def test_dense_with_zeros_unaffected_by_registration(tmp_path):
    model = prune_model_(tiny_llama(), "bitmask")
    model.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not sparse_modules(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_register_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    hpf.register()
    hpf.register()
    assert AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is hpf.HfPruneSparseQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is hpf.HfPruneSparseConfig


_STOCK_LOAD = """
import sys
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert "hf_prune" not in sys.modules
print("LOADED")
"""


def test_stock_transformers_refuses_compressed_checkpoint(tmp_path):
    model = prune_model_(tiny_llama(), "2:4")
    hpf.save_sparse_pretrained(model, tmp_path / "ckpt", "2:4")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _STOCK_LOAD, str(tmp_path / "ckpt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # What really happens: transformers warns "Unknown quantization type, got hf_prune_sparse", then the
    # zero-size `<name>.weight` placeholders mismatch the model's shapes, its load report lists the
    # sentinel key that says what to install, and from_pretrained raises instead of loading random weights.
    assert proc.returncode != 0 and "LOADED" not in proc.stdout
    assert "Unknown quantization type, got hf_prune_sparse" in proc.stderr
    assert "pip install hf_prune" in proc.stderr
    assert "RuntimeError" in proc.stderr and "ignore_mismatched_sizes" in proc.stderr


# --------------------------------------------------------------------------- bad input / atomicity


def test_2_4_on_unstructured_model_is_rejected_and_dir_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    model = prune_model_(tiny_llama(), "bitmask")
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        hpf.save_sparse_pretrained(model, out, "2:4")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs left behind
    with pytest.raises(ValueError, match="nothing to compress"):
        hpf.save_sparse_pretrained(tiny_llama(), out, "bitmask")


def test_existing_dir_keeps_user_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    model = prune_model_(tiny_llama(), "2:4")
    model.save_pretrained(out)  # an older dense checkpoint in the same folder
    hpf.save_sparse_pretrained(model, out, "2:4")
    assert (out / "tokenizer.json").read_text() == "{}"
    assert len(sparse_modules(AutoModelForCausalLM.from_pretrained(out))) == 14
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _rewrite(path: Path, fn) -> None:
    sd = load_file(path)
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})


def test_corrupt_checkpoints_fail_clearly(tmp_path):
    model = prune_model_(tiny_llama(), "bitmask")
    hpf.save_sparse_pretrained(model, tmp_path / "ok", "bitmask")
    key = "model.layers.1.mlp.up_proj.weight_values"

    def variant(name: str, fn) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in (tmp_path / "ok").iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        fn(d)
        return d

    truncated_values = variant(
        "trunc", lambda d: _rewrite(d / "model.safetensors", lambda sd: sd.__setitem__(key, sd[key][:-3]))
    )
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.mlp\.up_proj: bitmask marks \d+ kept weights but \d+ values"
    ):
        AutoModelForCausalLM.from_pretrained(truncated_values)

    missing = variant("missing", lambda d: _rewrite(d / "model.safetensors", lambda sd: sd.pop(key)))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj"):
        AutoModelForCausalLM.from_pretrained(missing)

    def bad_meta(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"]["modules"]["model.layers.0.mlp.down_proj"] = [64, 96]
        (d / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(ValueError, match=r"down_proj: metadata says \[64, 96\]"):
        AutoModelForCausalLM.from_pretrained(variant("meta", bad_meta))

    def cut_file(d: Path) -> None:
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])

    with pytest.raises(Exception, match="incomplete metadata, file not fully covered"):  # SafetensorError
        AutoModelForCausalLM.from_pretrained(variant("cut", cut_file))


def test_sentinel_and_placeholders_on_disk(tmp_path):
    model = prune_model_(tiny_llama(), "2:4")
    hpf.save_sparse_pretrained(model, tmp_path / "c", "2:4")
    with safe_open(tmp_path / "c" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["requires"].startswith("This checkpoint stores compressed sparse weights")
        assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_shape() == [0]
    assert SENTINEL_KEY in keys
    assert "model.layers.0.mlp.up_proj.weight_indices" in keys
    assert "lm_head.weight_values" not in keys and "model.embed_tokens.weight" in keys  # never compressed


def test_sharded_save_replaces_stale_single_file(tmp_path):
    out = tmp_path / "out"
    model = prune_model_(tiny_llama(), "bitmask")
    model.save_pretrained(out)  # old dense single-file checkpoint
    hpf.save_sparse_pretrained(model, out, "bitmask", max_shard_size="50KB")
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert len(sparse_modules(loaded)) == 14
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
