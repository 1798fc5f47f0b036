"""The hf-prune CLI end to end on a tiny saved model (real files, real from_pretrained)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny_models import SAMPLE_TEXT, save_tiny

from hf_prune.cli import main


@pytest.fixture()
def model_dir(tmp_path):
    path = tmp_path / "tiny-llama"
    save_tiny(path)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    return path


def test_prune_eval_inspect(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(["prune", str(model_dir), "--method", "sparsegpt", "--sparsity", "0.5", "--structure", "unstructured",
               "--calibration", str(tmp_path / "calib.txt"), "--output", str(out), "--num-samples", "4",
               "--seqlen", "32", "--dtype", "float32", "--eval", "--eval-dense", "--eval-text",
               str(tmp_path / "calib.txt"), "--eval-seqlen", "64"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "achieved sparsity 50.00%" in printed and "pruned perplexity" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["pruning_config"]["method"] == "sparsegpt"
    results = json.loads((out / "eval_results.json").read_text())
    assert results["pruned"]["ppl"] > 0 and results["dense"]["ppl"] > 0

    assert main(["eval", str(out), "--text", str(tmp_path / "calib.txt"), "--seqlen", "64", "--json",
                 "--dtype", "float32", "--max-windows", "64"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ppl"] == pytest.approx(results["pruned"]["ppl"], rel=1e-4)

    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in shown and "sparsegpt" in shown


def test_structure_without_sparsity_and_refuses_existing_output(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    args = ["prune", str(model_dir), "--method", "magnitude", "--structure", "4:8", "--output", str(out),
            "--dtype", "float32"]
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["pruning_config"]["sparsity"] == 0.5
    with pytest.raises(SystemExit, match="--overwrite"):
        main(args)


def test_bad_flag_value_exits_with_message(model_dir, tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hf_prune.cli", "prune", str(model_dir), "--sparsity", "1.5",
                           "--output", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "sparsity=1.5 must be a number in [0, 1)" in proc.stderr


def test_prune_help_groups_every_option_by_method_with_help() -> None:
    import dataclasses

    from hf_prune.cli import CLI_FAMILIES, _config_from_args, build_parser
    from hf_prune.registry import available_methods, get_spec

    parser = build_parser()
    prune_parser = parser._subparsers._group_actions[0].choices["prune"]  # argparse has no public accessor
    titles = {g.title: [a for a in g._group_actions] for g in prune_parser._action_groups}
    flags = {a.dest: a for actions in titles.values() for a in actions}
    for method in available_methods():
        spec = get_spec(method)
        if spec.family not in CLI_FAMILIES or spec.options is None:
            continue
        for f in dataclasses.fields(spec.options):
            assert f.name in flags, f"{method}: option {f.name} has no flag"
            assert f.metadata["help"] and flags[f.name].help, f"{method}: option {f.name} has no help"
            assert any(method in title.split(" options")[0].split(", ") for title, actions in titles.items()
                       if flags[f.name] in actions), f"{f.name} is not in a group named after {method}"
    cfg = _config_from_args(parser.parse_args(["prune", "m", "-o", "out", "--method", "sparsegpt", "--blocksize", "64",
                                               "--no-owl", "--layer-sparsity", '{"q_proj": 0.3}']))
    assert (cfg.options.blocksize, cfg.options.owl, cfg.options.layer_sparsity) == (64, False, {"q_proj": 0.3})
    cfg = _config_from_args(parser.parse_args(["prune", "m", "-o", "out", "--method", "flap", "--sparsity", "0.2",
                                               "--no-bias-compensation", "--width-units", "mlp"]))
    assert (cfg.options.bias_compensation, cfg.options.width_units) == (False, "mlp")


def test_prune_moe_experts_from_the_command_line(tmp_path, capsys) -> None:
    from tiny_models import build_moe

    src = tmp_path / "tiny-mixtral"
    save_tiny(src, build_moe("mixtral"))
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    out = tmp_path / "out"
    assert main(["prune", str(src), "--method", "reap", "--sparsity", "0.25", "--expert-allocation", "global",
                 "--no-super-expert-guard", "--calibration", str(tmp_path / "calib.txt"), "--output", str(out),
                 "--num-samples", "4", "--seqlen", "32", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "routed experts" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["pruning_config"]["method"] == "reap" and config["pruning_config"]["super_expert_guard"] is False
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["config"]["plan_info"]["experts_before"] - report["config"]["plan_info"]["experts_after"] == 6
