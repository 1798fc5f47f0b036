"""Save -> reload of structurally pruned tiny models through every load path, with identical logits.

* ``stock``: uniform shapes. The rewritten stock config fields describe the model; a subprocess without hf_prune
  loads it with plain ``AutoModelForCausalLM.from_pretrained``.
* ``per_layer``: non-uniform shapes. Loads with hf_prune imported (no ``trust_remote_code``, no prompt), and in a
  subprocess without hf_prune importable with ``trust_remote_code=True`` (the saved ``modeling_hf_prune.py``).

``RELOAD_TABLE`` is the machine-readable result (architecture x plan kind -> path) that the README quotes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_structured_surgery import make_plan
from tiny_models import ARCHITECTURES, build, calib_ids
from transformers import AutoModelForCausalLM

import hf_prune  # noqa: F401  (installs the load hook)
from hf_prune.structure.arch import block_specs
from hf_prune.structure.config_io import is_structured
from hf_prune.structure.plan import LayerPlan, StructuredPlan
from hf_prune.structure.surgery import apply_plan

# kind -> what it cuts: channels = same MLP width in every block (only listed where it differs from uniform);
# uniform = same MLP width and head counts in every block; mixed = per-block widths/heads, one MLP and one attention sublayer removed; blocks = one block removed.
RELOAD_TABLE: dict[str, dict[str, str]] = {
    **{a: {"uniform": "stock", "mixed": "per_layer", "blocks": "stock"}
       for a in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")},
    **{a: {"channels": "stock", "uniform": "per_layer", "mixed": "per_layer", "blocks": "stock"}
       for a in ("gpt2", "opt", "gpt_neox")},
    "qwen3_moe": {"uniform": "stock", "mixed": "per_layer", "blocks": "stock"},
}

HIDE_HF_PRUNE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", ""))]
import os
# drop the repo itself (and its folders, e.g. tests/), but keep a virtualenv that lives inside it (.venv/...)
sys.path[:] = [p for p in sys.path if not (os.path.abspath(p or ".") == REPO
                                           or (os.path.abspath(p or ".").startswith(REPO + os.sep)
                                               and "site-packages" not in p))]
try:
    import hf_prune
    raise SystemExit("hf_prune is importable in the clean subprocess: " + hf_prune.__file__)
except ImportError:
    pass
"""

LOADER = """
import json, sys, torch
from transformers import AutoModelForCausalLM
jobs = json.loads(sys.argv[1])
ids = torch.load(jobs["ids"])
for folder in jobs["folders"]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=jobs["trust"])
    with torch.no_grad():
        torch.save(model(ids).logits, folder + "/reloaded.pt")
print("loaded", len(jobs["folders"]))
"""


def _channels_plan(model: torch.nn.Module) -> StructuredPlan:
    return StructuredPlan(layers={s.index: LayerPlan(mlp_keep=list(range(0, s.mlp.intermediate, 2)))
                                  for s in block_specs(model)})


CASES = [(arch, kind) for arch, kinds in RELOAD_TABLE.items() for kind in kinds]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, torch.Tensor, str]]:
    """Prune, save and record logits for every (arch, kind) once."""
    root = tmp_path_factory.mktemp("structured")
    ids = calib_ids(2, 10)
    torch.save(ids, root / "ids.pt")
    out = {}
    for arch, kind in CASES:
        model = build(arch)
        plan = _channels_plan(model) if kind == "channels" else make_plan(model, kind, seed=7)
        apply_plan(model, plan)
        with torch.no_grad():
            logits = model(ids).logits
        folder = root / f"{arch}-{kind}"
        model.save_pretrained(folder)
        out[(arch, kind)] = (folder, logits, "per_layer" if is_structured(model.config) else "stock")
    return out


def test_reload_table_matches(saved: dict) -> None:
    found: dict[str, dict[str, str]] = {}
    for (arch, kind), (folder, _, path) in saved.items():
        found.setdefault(arch, {})[kind] = path
        files = set(os.listdir(folder))
        assert ("modeling_hf_prune.py" in files) == (path == "per_layer")
        config = json.loads((folder / "config.json").read_text())
        assert ("auto_map" in config) == (path == "per_layer") == ("hf_prune_structure" in config)
    print(json.dumps(found, indent=1))
    assert found == RELOAD_TABLE
    assert set(RELOAD_TABLE) == set(ARCHITECTURES)


def test_reload_with_hf_prune_imported(saved: dict) -> None:
    ids = calib_ids(2, 10)
    for (arch, kind), (folder, logits, path) in saved.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, logits), (arch, kind)
        assert is_structured(model.config) == (path == "per_layer")


def _run_clean(tmp_path: Path, folders: list[Path], trust: bool) -> None:
    """Load ``folders`` in a fresh interpreter where hf_prune cannot be imported (cwd outside the repo)."""
    repo = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "load.py"
    script.write_text(f"REPO = {repo!r}\n" + textwrap.dedent(HIDE_HF_PRUNE) + textwrap.dedent(LOADER))
    jobs = {"ids": str(folders[0].parent / "ids.pt"), "folders": [str(f) for f in folders], "trust": trust}
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-I", str(script), json.dumps(jobs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"loaded {len(folders)}" in proc.stdout


# The clean-subprocess loads (the slow part) cover every architecture and both paths: each architecture's first
# stock kind and every per-layer case. The in-process reload above covers all cases.
CLEAN_STOCK = {arch: next(k for k, p in kinds.items() if p == "stock") for arch, kinds in RELOAD_TABLE.items()}


@pytest.mark.parametrize("path", ["stock", "per_layer"])
def test_reload_without_hf_prune(saved: dict, tmp_path: Path, path: str) -> None:
    cases = {key: value for key, value in saved.items()
             if value[2] == path and (path == "per_layer" or CLEAN_STOCK[key[0]] == key[1])}
    _run_clean(tmp_path, [folder for folder, _, _ in cases.values()], trust=path == "per_layer")
    for (arch, kind), (folder, logits, _) in cases.items():
        reloaded = torch.load(folder / "reloaded.pt")
        if arch == "qwen3_moe":  # the fused-experts kernel may sum experts in another order in a fresh process
            torch.testing.assert_close(reloaded, logits, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(reloaded, logits), (arch, kind)


def test_resave_of_reloaded_structured_model(saved: dict, tmp_path: Path) -> None:
    folder, logits, _ = saved[("gpt2", "mixed")]
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(calib_ids(2, 10)).logits, logits)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]


def test_save_pretrained_push_to_hub_uploads_the_finished_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """``save_pretrained(..., push_to_hub=True)`` on a per-layer pruned model uploads the folder hf_prune finished
    (weights, config with auto_map, the trust_remote_code file), not transformers' own earlier upload. The Hub is
    unreachable here, so the two huggingface_hub calls are replaced by recorders of what they were given."""
    import huggingface_hub

    calls: dict[str, object] = {}

    class _Repo:
        repo_id = "me/pruned"

    def create_repo(repo_id: str, **kw: object) -> _Repo:
        calls["create_repo"] = (repo_id, kw)
        return _Repo()

    def upload_folder(**kw: object) -> None:
        calls["upload"] = kw
        calls["files"] = sorted(p.name for p in Path(str(kw["folder_path"])).iterdir())
        calls["config"] = json.loads((Path(str(kw["folder_path"])) / "config.json").read_text())

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    model = build("llama")
    apply_plan(model, make_plan(model, "mixed", seed=7))
    assert is_structured(model.config)
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="pruned", commit_message="m", private=True)
    assert calls["create_repo"][0] == "pruned" and calls["create_repo"][1]["private"] is True
    assert calls["upload"]["repo_id"] == "me/pruned" and calls["upload"]["commit_message"] == "m"
    assert "modeling_hf_prune.py" in calls["files"] and "model.safetensors" in calls["files"]
    assert "auto_map" in calls["config"]


OLD_LOOKUP = '''        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = kwargs.get("layer_past")
'''


def test_checkpoint_saved_before_the_cache_rename_loads_with_current_code(saved: dict, tmp_path: Path) -> None:
    """A per-layer checkpoint whose modeling file reads only ``past_key_values`` (hf_prune before transformers
    5.24 support): with hf_prune installed the package's code builds it, so every layer's cache advances;
    ``hf-prune upgrade`` replaces the folder's copy for trust_remote_code users."""
    import shutil

    from hf_prune.cli import main
    from hf_prune.core.compat import output_cache
    from hf_prune.structure import modeling_hf_prune as shipped
    from hf_prune.structure.loading import MODELING_FILE

    folder = tmp_path / "old"
    shutil.copytree(saved[("llama", "mixed")][0], folder)
    current = (folder / MODELING_FILE).read_text()
    new_lookup = next(line for line in current.splitlines() if "CACHE_KWARGS if kwargs.get" in line) + "\n"
    (folder / MODELING_FILE).write_text(current.replace(new_lookup, OLD_LOOKUP))
    model = AutoModelForCausalLM.from_pretrained(folder)
    zero = [m for m in model.modules() if isinstance(m, shipped.ZeroAttention)]
    assert zero and all(type(m) is shipped.ZeroAttention for m in zero)  # the package's class, not the folder's
    with torch.no_grad():
        cache = output_cache(model(calib_ids(1, 9), use_cache=True))
    assert [cache.get_seq_length(i) for i in range(len(model.model.layers))] == [9] * len(model.model.layers)
    assert main(["upgrade", str(folder)]) == 0
    assert (folder / MODELING_FILE).read_text() == Path(shipped.__file__).read_text()
    assert main(["upgrade", str(folder)]) == 0  # already current: no change
    assert main(["upgrade", str(tmp_path)]) == 2  # not a per-layer checkpoint


def test_failing_init_leaves_no_build_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model ``__init__`` that raises while a per-layer config is being built leaves no entry behind in the
    build registry and puts the hidden per-layer spec back, through hf_prune's load hook (entry ended when the
    half-built model is freed) and through the ``trust_remote_code`` class (ended at once); the same config
    then still builds the pruned shapes."""
    import gc

    from transformers.models.llama import modeling_llama

    from hf_prune.structure import modeling_hf_prune as shipped

    model = build("llama")
    apply_plan(model, make_plan(model, "mixed"))
    config = model.config
    assert is_structured(config)
    spec = config.__dict__.get("_heterogeneity_spec")

    def fail(self: torch.nn.Module, *args: object, **kwargs: object) -> None:
        raise RuntimeError("init failed")

    classes = (modeling_llama.LlamaForCausalLM, shipped.structured_class(modeling_llama.LlamaForCausalLM))
    with monkeypatch.context() as patch:
        patch.setattr(modeling_llama.LlamaModel, "__init__", fail)
        for cls in classes:
            with pytest.raises(RuntimeError, match="init failed"):
                cls(config)
            gc.collect()
            assert id(config) not in shipped._BUILDS, cls.__name__
            assert config.__dict__.get("_heterogeneity_spec") is spec, cls.__name__
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for cls in classes:
        rebuilt = cls(config)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes, cls.__name__
        assert not shipped._BUILDS
