"""Every calibration source becomes the same kind of token tensor, reproducibly."""

from __future__ import annotations

import pytest
import torch
from tiny_models import SAMPLE_TEXT, build, tiny_tokenizer

from hf_prune import PruningConfig, prune
from hf_prune.core.calibration import build_calibration


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_text_sources_agree(tmp_path, tok) -> None:
    path = tmp_path / "calib.txt"
    path.write_text(SAMPLE_TEXT)
    from_file = build_calibration(str(path), tok, 6, 32, seed=0)
    from_list = build_calibration([SAMPLE_TEXT], tok, 6, 32, seed=0)
    assert from_file.shape == (6, 32) and from_file.dtype == torch.long
    assert torch.equal(from_file, from_list)
    assert torch.equal(from_list, build_calibration([SAMPLE_TEXT], tok, 6, 32, seed=0))
    assert not torch.equal(from_list, build_calibration([SAMPLE_TEXT], tok, 6, 32, seed=1))
    ids = tok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    joined = ",".join(map(str, ids))
    for row in from_list.tolist():  # each sample is a contiguous window of the tokenized text
        assert ",".join(map(str, row)) in joined


def test_dataset_sources(tmp_path, tok) -> None:
    datasets = pytest.importorskip("datasets")
    paragraphs = SAMPLE_TEXT.split(". ")
    ds_text = datasets.Dataset.from_dict({"text": paragraphs})
    out = build_calibration(ds_text, tok, 4, 16, seed=0)
    assert out.shape == (4, 16)
    ds_ids = datasets.Dataset.from_dict({"input_ids": [list(range(i, i + 40)) for i in range(10)]})
    out = build_calibration(ds_ids, None, 4, 16, seed=0)
    assert out.shape == (4, 16) and int(out.max()) < 50
    ds_text.save_to_disk(str(tmp_path / "ds"))
    assert build_calibration(str(tmp_path / "ds"), tok, 4, 16, seed=0).shape == (4, 16)
    ds_text.to_json(str(tmp_path / "data.jsonl"))
    assert build_calibration(str(tmp_path / "data.jsonl"), tok, 4, 16, seed=0).shape == (4, 16)
    with pytest.raises(Exception, match="0 rows|empty"):
        build_calibration(datasets.Dataset.from_dict({"text": []}), tok, 4, 16)


def test_dataloader_and_tensor_sources() -> None:
    rows = torch.arange(0, 20 * 64).view(20, 64) % 300
    loader = torch.utils.data.DataLoader([{"input_ids": r} for r in rows], batch_size=4)
    out = build_calibration(loader, None, 8, 32, seed=0)
    assert out.shape == (8, 32)
    tensor = torch.randint(0, 300, (10, 24))
    assert torch.equal(build_calibration(tensor, None, 4, 512, seed=0), tensor[:4])


def test_prune_with_text_and_tokenizer(tok) -> None:
    model = build("llama")
    report = prune(model, PruningConfig(method="wanda", seqlen=32, num_calibration_samples=4),
                   [SAMPLE_TEXT], tokenizer=tok, show_progress=False, verbose=False)
    assert report.num_calibration_samples == 4 and report.seqlen == 32
