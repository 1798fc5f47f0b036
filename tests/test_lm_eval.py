"""``hf-prune eval DIR --tasks ...``: lm-evaluation-harness in-process on a tiny pruned checkpoint, with a local task
(YAML over a 10-line JSONL file, no Hub access); the scores land in ``pruning_report.json`` and the model card."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from tiny_models import build, calib_ids, tiny_tokenizer

import hf_prune
from hf_prune import PruningConfig
from hf_prune.cli import main
from hf_prune.io.save import REPORT_FILE
from hf_prune.report import load_report

TASK = "hf_prune_toy_mc"


def _task_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = [{"question": f"Is {i} an even number?", "choices": ["yes", "no"], "label": i % 2} for i in range(10)]
    (folder / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "toy.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'toy.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}} Answer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder


def test_eval_tasks_records_scores_in_report_and_card(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval", reason='lm-evaluation-harness not installed (pip install "hf_prune[eval]")')
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build("llama")
    hf_prune.prune(model, PruningConfig(method="magnitude", sparsity=0.5), calib_ids(2, 16))
    out = tmp_path / "pruned"
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    tasks = _task_dir(tmp_path)
    assert main(["eval", str(out), "--tasks", TASK, "--include-path", str(tasks), "--limit", "10",
                 "--dtype", "float32", "--batch-size", "4", "--json"]) == 0
    printed = capsys.readouterr().out
    start = printed.index('{\n  "')  # lm_eval may print its own lines first
    scores = json.loads(printed[start: printed.rindex("}") + 1])
    acc = scores[TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0
    report = load_report(json.loads((out / REPORT_FILE).read_text()))
    assert report.evaluation["lm_eval"][TASK]["acc,none"] == acc and report.evaluation["lm_eval_config"]["limit"] == 10
    card = ModelCard.load(out / "README.md")
    assert f"| {TASK} | acc,none | {acc:.4f} |" in card.text and "limit 10" in card.text
    assert [(r.dataset_type, r.metric_type) for r in card.data.eval_results] == [(TASK, "acc")]


def test_missing_lm_eval_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_prune.evaluate import lm_eval_scores

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r'pip install "hf_prune\[eval\]"'):
        lm_eval_scores(build("llama"), None, ["x"])
    with pytest.raises(SystemExit, match=r"hf_prune\[eval\]"):
        main(["eval", str(tmp_path), "--tasks", "x"])
