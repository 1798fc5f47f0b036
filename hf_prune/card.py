"""Model cards for pruned checkpoints: ``README.md`` (Hub metadata + what was done + how to load) and a per-layer
sparsity plot (``sparsity.png``), written by every ``save_pretrained`` of a pruned model.

The card is rendered from ``hf_prune/templates/model_card.md`` (``model_cards/template.md``) with `huggingface_hub.ModelCard.from_template`; the metadata
comes from `huggingface_hub.ModelCardData` (no hand-written YAML). Everything in it is read from the checkpoint
folder itself (``config.json``, ``pruning_report.json`` with its ``evaluation`` results, the shipped
``modeling_hf_prune.py``), plus the base model's identity and card fields when the model object is at hand, so a
card can be rewritten later (`record_evaluation`, ``hf-prune push``) from the folder alone.

Who owns ``README.md``: a generated card carries the HTML comment `hf_prune.io.save.CARD_MARKER` and is rewritten
on every save; a ``README.md`` without it is the user's and is never overwritten (`write_model_card` skips it with
a warning, and `hf_prune.io.save.publish_directory` keeps it when a new save lands in the folder).

The plot needs matplotlib (``pip install "hf_prune[plot]"``); without it the card says so and saving still works.

Example:
    >>> import json, os, tempfile
    >>> from hf_prune.report import LayerRow, PruningReport
    >>> d = tempfile.mkdtemp()
    >>> _ = open(os.path.join(d, "config.json"), "w").write(json.dumps(
    ...     {"model_type": "llama", "pruning_config": {"method": "wanda", "sparsity": 0.5}}))
    >>> _ = PruningReport(method="wanda", structure="2:4", target_sparsity=0.5, num_calibration_samples=8,
    ...                   seqlen=32, layers=[LayerRow("model.layers.0.mlp.up_proj", 0, [4, 4], 16, 8, 0.5)],
    ...                   total_params=32).save(d)
    >>> card = write_model_card(d, base_model="org/base", plot=False)
    >>> card.data.base_model, card.data.tags[:4]
    ('org/base', ['hf_prune', 'pruned', 'wanda', '2:4'])
    >>> "8 samples × 32 tokens" in open(os.path.join(d, "README.md")).read()
    True
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from .io.atomic import atomic_write, atomic_write_text
from .io.save import CARD_FILE, CARD_MARKER, REPORT_FILE, is_generated_card

__all__ = ["PLOT_FILE", "TEMPLATE", "base_model_of", "build_model_card", "write_model_card", "record_evaluation",
           "read_evaluation", "save_sparsity_plot"]

logger = logging.getLogger("hf_prune")

#: the per-layer sparsity plot written beside the card
PLOT_FILE = "sparsity.png"
#: the Jinja template of the card, shipped inside the package (``model_cards/template.md`` links to it)
TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md"
PLOT_INSTALL = 'pip install "hf_prune[plot]"'
#: base-model card fields carried over to the pruned model's card
CARRIED_FIELDS = ("license", "license_name", "license_link", "language", "datasets", "pipeline_tag")
_EVAL_FILE = "eval_results.json"
_MODELING_FILE = "modeling_hf_prune.py"  # hf_prune.structure.loading.MODELING_FILE
_SPARSE_QUANT_METHOD = "hf_prune_sparse"  # hf_prune.formats.QUANT_METHOD
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-[^.]+$")  # hf_prune.io.atomic.atomic_directory's folder names
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HF_CACHE_DIR = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")
#: the embedded default model (hf_prune.assets.MODEL_SUBDIR) and what it is
_EMBEDDED = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", {"license": "apache-2.0",
                                                                            "language": ["en"]})}


# --------------------------------------------------------------------------- base model


def base_model_of(name_or_path: str | os.PathLike | None) -> tuple[str | None, dict[str, Any]]:
    """``(Hub repo id or None, card fields to carry)`` for the model a pruned model came from.

    ``name_or_path`` is what the model was loaded from (``config._name_or_path``): a Hub id is used as it is; a
    folder in the Hugging Face cache (``models--org--name/snapshots/<sha>``) gives ``org/name``; a folder holding an
    hf_prune card (a pruned model pruned again) gives that card's ``base_model``; another local folder has no Hub
    id (the Hub only accepts repo ids as ``base_model``). Card fields (license, language, datasets, ...) come from
    the folder's ``README.md`` or, for a Hub id, from a README.md already in the local Hub cache (never the network).

    Example:
        >>> base_model_of("meta-llama/Llama-3.2-1B")[0], base_model_of("/tmp/no/such/dir")[0], base_model_of(None)
        ('meta-llama/Llama-3.2-1B', None, (None, {}))
    """
    if not name_or_path:
        return None, {}
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        fields = _card_fields(os.path.join(path, CARD_FILE))
        repo = fields.pop("base_model", None) if is_generated_card(os.path.join(path, CARD_FILE)) else None
        fields.pop("base_model", None)
        match = _HF_CACHE_DIR.search(Path(path).resolve().as_posix())
        if match:
            repo = f"{match['org']}/{match['name']}"
        elif Path(path).name in _EMBEDDED and not repo:
            repo, known = _EMBEDDED[Path(path).name]
            fields = {**known, **fields}
        return (repo if isinstance(repo, str) else None), fields
    if _REPO_ID.match(path) and not path.startswith((".", "~")):
        fields = {}
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, CARD_FILE)
            if isinstance(cached, str):
                fields = _card_fields(cached)
                fields.pop("base_model", None)
        except Exception:  # noqa: BLE001 - a card is optional; a malformed id or cache never breaks a save
            fields = {}
        return path, fields
    return None, {}


def _card_fields(path: str | os.PathLike) -> dict[str, Any]:
    """``base_model`` and the `CARRIED_FIELDS` of the card at ``path`` ({} if there is none or it is unreadable)."""
    if not os.path.isfile(path):
        return {}
    try:
        from huggingface_hub import ModelCard

        data = ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except Exception as exc:  # noqa: BLE001 - a broken card of the input model must not break the save
        logger.warning("could not read the model card %s (%s); its license etc. are not carried over", path, exc)
        return {}
    return {k: data[k] for k in ("base_model", *CARRIED_FIELDS) if data.get(k)}


# --------------------------------------------------------------------------- evaluation


def read_evaluation(folder: str | os.PathLike) -> dict[str, Any]:
    """The evaluation results stored in ``folder``: the report's ``evaluation`` (else ``eval_results.json``'s).

    Example:
        >>> import tempfile
        >>> read_evaluation(tempfile.mkdtemp())
        {}
    """
    folder = Path(folder)
    report = _read_json(folder / REPORT_FILE)
    if report is not None:
        return dict(report.get("evaluation") or {})
    return dict((_read_json(folder / _EVAL_FILE) or {}).get("evaluation") or {})


def record_evaluation(folder: str | os.PathLike, results: dict[str, Any]) -> dict[str, Any]:
    """Merge ``results`` into the evaluation stored in ``folder`` and rewrite its card; return the merged dict.

    Keys: ``"perplexity"`` / ``"dense_perplexity"`` (`hf_prune.evaluate.PerplexityResult.to_dict`),
    ``"perplexity_by_source"`` (``{text name: PerplexityResult.to_dict()}``) and ``"lm_eval"`` (``{task: {metric: value}}``). They go into ``pruning_report.json`` (its ``evaluation`` field);
    a folder without a report keeps them in ``eval_results.json`` under ``"evaluation"``. Files are written
    atomically; the card is regenerated unless the folder's ``README.md`` is the user's own.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> record_evaluation(d, {"lm_eval": {"toy": {"acc,none": 0.5}}})
        {'lm_eval': {'toy': {'acc,none': 0.5}}}
        >>> record_evaluation(d, {"lm_eval": {"other": {"acc,none": 1.0}}})["lm_eval"]
        {'toy': {'acc,none': 0.5}, 'other': {'acc,none': 1.0}}
    """
    folder = Path(folder)
    merged = read_evaluation(folder)
    for key, value in results.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    report_path = folder / REPORT_FILE
    if report_path.is_file():
        from .report import load_report

        report = load_report(json.loads(report_path.read_text(encoding="utf-8")))
        report.evaluation = merged
        report.save(folder)
    else:
        data = _read_json(folder / _EVAL_FILE) or {}
        data["evaluation"] = merged
        atomic_write_text(folder / _EVAL_FILE, json.dumps(data, indent=2))
    if (folder / "config.json").is_file():
        write_model_card(folder)
    return merged


# --------------------------------------------------------------------------- plot


def save_sparsity_plot(report: dict[str, Any], path: str | os.PathLike) -> bool:
    """Plot per-layer sparsity (or, for structured reports, the fraction removed per block) as a PNG at ``path``.

    Returns False, writing nothing, when matplotlib is missing (``pip install "hf_prune[plot]"``) or the report
    has no rows. Uses matplotlib's object API with the Agg canvas: no pyplot, no global backend change.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "s.png")
        >>> save_sparsity_plot({"kind": "oneshot", "layers": []}, p)
        False
    """
    structured = report.get("kind") == "structured"
    rows = report.get("blocks" if structured else "layers") or []
    if not rows:
        return False
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    if structured:
        values = [100 * float(r.get("fraction_removed", 0.0)) for r in rows]
        labels = [str(r["block"]) for r in rows]
        xlabel, ylabel, title = "decoder block", "parameters removed (%)", f"{report.get('method')}: removed per block"
    else:
        values = [100 * float(r.get("sparsity", 1 - r["nonzero"] / max(r["params"], 1))) for r in rows]
        labels = [r["name"] for r in rows]
        xlabel, ylabel = "layer (in model order)", "sparsity (%)"
        title = f"{report.get('method')} {report.get('structure')}: sparsity per layer"
    fig = Figure(figsize=(min(4 + 0.12 * len(values), 16), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(values)), values, width=0.85, color="#4c72b0")
    target = report.get("target_fraction" if structured else "target_sparsity")
    if target:
        ax.axhline(100 * float(target), color="#c44e52", linestyle="--", linewidth=1, label=f"target {target:.0%}")
        ax.legend(loc="lower right")
    ax.set_ylim(0, 100)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(labels) <= 40:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([lbl.rsplit(".", 2)[-2] + "." + lbl.rsplit(".", 1)[-1] if "." in lbl else lbl
                            for lbl in labels] if not structured else labels,
                           rotation=90 if not structured else 0, fontsize=6 if not structured else 8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": None}))
    return True


# --------------------------------------------------------------------------- card


def build_model_card(folder: str | os.PathLike, *, base_model: str | None = None,
                     base_fields: dict[str, Any] | None = None, plot_file: str | None = None,
                     tags: list[str] | None = None, repo_id: str | None = None) -> Any:
    """The `huggingface_hub.ModelCard` of the checkpoint in ``folder`` (not written).

    ``base_model``/``base_fields``: see `base_model_of`; when not given, they are taken from the card already in
    ``folder`` if hf_prune generated it (so rewriting a card keeps them). ``plot_file``: the plot's file name if one
    was written, else the card says how to get one. ``tags``: extra Hub tags. ``repo_id``: the Hub id the card
    is published under (its loading examples use it; default: the folder's name).

    Example:
        >>> import json, os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = open(os.path.join(d, "config.json"), "w").write(json.dumps({"pruning_config": {"method": "magnitude"}}))
        >>> card = build_model_card(d)
        >>> card.data.library_name, "magnitude" in card.data.tags
        ('transformers', True)
    """
    from huggingface_hub import ModelCard, ModelCardData

    from ._version import __version__

    folder = Path(folder)
    config = _read_json(folder / "config.json") or {}
    report = _read_json(folder / REPORT_FILE)
    evaluation = read_evaluation(folder)
    if base_model is None and base_fields is None and is_generated_card(folder / CARD_FILE):
        base_fields = _card_fields(folder / CARD_FILE)
        base_model = base_fields.pop("base_model", None)
    base_fields = dict(base_fields or {})
    pruning = dict(config.get("pruning_config") or {})
    method = str((report or {}).get("method") or pruning.get("method") or "unknown")
    structure = str((report or {}).get("structure") or pruning.get("structure") or "unstructured")
    kind = (report or {}).get("kind", "structured" if "achieved_fraction" in pruning else "oneshot")
    compressed = (config.get("quantization_config") or {}).get("quant_method") == _SPARSE_QUANT_METHOD
    remote_code = (folder / _MODELING_FILE).is_file()
    per_layer = remote_code or bool(config.get("hf_prune_structure"))

    all_tags = ["hf_prune", "pruned", method, structure, *(["sparse"] if kind != "structured" else []),
                *(["compressed"] if compressed else []), *(tags or [])]
    match = _TMP_NAME.match(folder.name)
    model_name = repo_id.rsplit("/", 1)[-1] if repo_id else match["name"] if match else folder.name
    data_kwargs: dict[str, Any] = {k: v for k, v in base_fields.items() if k in CARRIED_FIELDS}
    data_kwargs.setdefault("pipeline_tag", "text-generation")
    card_data = ModelCardData(
        base_model=base_model, library_name="transformers", tags=list(dict.fromkeys(all_tags)),
        eval_results=_eval_results(evaluation) or None, model_name=model_name if evaluation else None,
        **data_kwargs,
    )
    if base_model and kind == "training":
        # The Hub accepts base_model_relation in {adapter, merge, quantized, finetune}. Pruning during training
        # changes the weights by training, so "finetune" is right. One-shot and structured pruning fit none of them
        # (no training, no quantization): the field is left out and the Hub infers the relation itself.
        card_data.base_model_relation = "finetune"

    load_id = repo_id or model_name
    load_text, load_code = _load_instructions(load_id, compressed, per_layer)
    context = {
        "marker": CARD_MARKER,
        "title": f"{model_name}: {_describe(method, structure, kind, report, pruning)}",
        "summary": _summary(method, structure, kind, report, pruning, compressed, base_model),
        "base_model_line": (f"Base model: [`{base_model}`](https://huggingface.co/{base_model})." if base_model
                            else ""),
        "method": method,
        "structure": structure,
        "options": _options(report, pruning),
        "calibration": _calibration(report, pruning),
        "time_taken": f"{report['seconds']:.1f} s" if report and report.get("seconds") else "not recorded",
        "hf_prune_version": pruning.get("hf_prune_version", __version__),
        "result_line": _result_line(report, pruning),
        "plot_file": plot_file,
        "plot_caption": "parameters removed per block" if kind == "structured" else "sparsity per layer",
        "plot_hint": (None if not report else f"*No sparsity plot: matplotlib is not installed (`{PLOT_INSTALL}` "
                      "and save again to get one).*"),
        "table": _table(report) if report else None,
        "table_title": ("Removed width and blocks, per original decoder block" if kind == "structured"
                        else "Sparsity per layer"),
        "row_noun": "block" if kind == "structured" else "layer",
        "load_text": load_text,
        "load_code": load_code,
        "load_id": load_id,
        "remote_code": remote_code,
        "evaluation": _evaluation_text(evaluation),
    }
    return ModelCard.from_template(card_data, template_path=str(TEMPLATE), **context)


def write_model_card(folder: str | os.PathLike, model: Any = None, *, base_model: str | None = None,
                     tags: list[str] | None = None, plot: bool = True, repo_id: str | None = None) -> Any:
    """Write ``README.md`` (and ``sparsity.png``) into the checkpoint ``folder``; return the card, or None when
    ``folder`` holds a ``README.md`` that hf_prune did not write (kept as it is, with a warning).

    ``model``: the model just saved, for the base model's identity (``config._name_or_path``, see `base_model_of`);
    ``base_model`` overrides it. Without either, a card hf_prune generated before keeps its base model. Files are
    written atomically; matplotlib is optional (``plot=False`` keeps an existing plot and draws none).
    ``tags``/``repo_id``: see `build_model_card`.

    Example:
        >>> # see the module docstring for a full example
        >>> write_model_card.__name__
        'write_model_card'
    """
    folder = Path(folder)
    card_path = folder / CARD_FILE
    if card_path.exists() and not is_generated_card(card_path):
        logger.warning("%s has its own %s; hf_prune kept it and did not write a model card", folder, CARD_FILE)
        return None
    fields: dict[str, Any] | None = None
    if base_model is None and model is not None:
        config = getattr(model, "config", None)
        base_model, fields = base_model_of(getattr(config, "_name_or_path", None) or
                                           getattr(model, "name_or_path", None))
    elif base_model is not None:
        fields = {}
    report = _read_json(folder / REPORT_FILE)
    plot_file = None
    if plot and report is not None:
        plot_file = PLOT_FILE if save_sparsity_plot(report, folder / PLOT_FILE) else None
    elif (folder / PLOT_FILE).is_file():
        plot_file = PLOT_FILE
    card = build_model_card(folder, base_model=base_model, base_fields=fields, plot_file=plot_file, tags=tags,
                            repo_id=repo_id)
    atomic_write_text(card_path, str(card))
    return card


# --------------------------------------------------------------------------- pieces


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _describe(method: str, structure: str, kind: str, report: dict | None, pruning: dict) -> str:
    if kind == "structured":
        frac = (report or {}).get("achieved_fraction", pruning.get("achieved_fraction"))
        return f"{method} structured pruning ({structure})" + (f", {frac:.1%} of decoder parameters removed"
                                                               if frac is not None else "")
    sparsity = (report or {}).get("achieved_sparsity", pruning.get("achieved_sparsity"))
    return f"{method} {structure} pruning" + (f", {sparsity:.1%} sparse" if sparsity is not None else "")


def _summary(method: str, structure: str, kind: str, report: dict | None, pruning: dict, compressed: bool,
             base_model: str | None) -> str:
    how = {"training": "pruned during training (hf_prune's `PruningCallback`)",
           "structured": "structurally pruned (weights physically removed)"}.get(kind, "pruned in one shot")
    text = (f"This is `{base_model}`, {how}" if base_model else f"This model was {how}") + \
        f" with hf_prune using `{method}` ({structure})."
    if kind != "structured":
        text += (" The weights are stored compressed (`sparse_format`); hf_prune is needed to load them."
                 if compressed else " The zeroed weights are stored as plain dense safetensors (exact zeros).")
    return text


def _options(report: dict | None, pruning: dict) -> list[tuple[str, str]]:
    config = dict((report or {}).get("config") or pruning)
    skip = {"method", "structure", "num_calibration_samples", "seqlen", "hf_prune_version", "achieved_sparsity",
            "achieved_fraction"}
    if config.get("domain_weight") is None:
        skip.add("domain_source")  # only meaningful with dual importance
    return [(k, _cell(json.dumps(v) if not isinstance(v, str) else v)) for k, v in config.items()
            if k not in skip and v not in (None, [], {}, "")]


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (GitHub-flavoured: ``|`` escaped, even in code spans)."""
    return text.replace("|", "\\|").replace("\n", " ")


def _calibration(report: dict | None, pruning: dict) -> str:
    source = report if report is not None else pruning  # the report records what ran; the config only defaults
    n, seqlen = source.get("num_calibration_samples"), source.get("seqlen")
    if (report or {}).get("kind") == "training":
        return "the training data (no calibration pass)"
    if not n:
        return "none (data-free method)" if report else "not recorded"
    text = f"{n} samples × {seqlen} tokens"
    sources = (report or {}).get("calibration_sources")
    if sources:
        text += ": " + ", ".join(f"{s['name']} {s['samples']}" for s in sources)
        dual = [s for s in sources if s.get("side") == "domain"]
        if dual:
            text += f" (dual importance: general + {dual[0]['weight']:g} × {dual[0]['name']})"
    return _cell(text)


def _result_line(report: dict | None, pruning: dict) -> str:
    if report is None:
        return ("The per-layer report was not saved with this checkpoint (it was re-saved from a loaded model); "
                "the settings above come from `config.json`.")
    if report.get("kind") == "structured" and report.get("structure") == "experts":
        info = (report.get("config") or {}).get("plan_info", {})
        before, after = info.get("experts_before", 0), info.get("experts_after", 0)
        supers = info.get("super_experts") or []
        guard = ("kept by the guard" if info.get("super_expert_guard") else "the guard was off") if supers else ""
        return (f"**Result:** {before - after} of {before} routed experts removed (target "
                f"{report.get('target_fraction', 0):.1%}, {info.get('allocation', '?')} allocation"
                f"{', merged into kept experts' if info.get('merge') else ''}); {report['params_before']:,} → "
                f"{report['params_after']:,} parameters. Super experts (layer, expert): "
                f"{', '.join(f'({i}, {e})' for i, e in supers) or 'none found'}"
                f"{' – ' + guard if guard else ''}.")
    if report.get("kind") == "structured":
        return (f"**Result:** {report['params_before']:,} → {report['params_after']:,} parameters; "
                f"{report.get('achieved_fraction', 0):.2%} of the decoder-block parameters removed "
                f"(target {report.get('target_fraction', 0):.1%}).")
    text = (f"**Result:** {report.get('achieved_sparsity', 0):.2%} of the weights in {len(report.get('layers', []))} "
            f"pruned layers are zero (target {report.get('target_sparsity', 0):.1%}); "
            f"{report.get('total_nonzero', 0):,} of {report.get('total_params', 0):,} model parameters are non-zero.")
    if report.get("owl_choice"):
        from .report import owl_line

        text += f" {owl_line(report['owl_choice'], report.get('block_sparsity'))}."
    return text


def _table(report: dict) -> str:
    if report.get("kind") == "structured":
        def units(pair: Any) -> str:
            return "–" if not pair else f"{pair[0]} → {pair[1]}"

        moe = any(r.get("experts") for r in report.get("blocks", []))
        lines = ["| block | MLP channels | heads | KV heads |" + (" experts |" if moe else "")
                 + " removed | params | cut |", "|---:|---:|---:|---:|" + ("---:|" if moe else "") + "---|---:|---:|"]
        lines += [f"| {r['block']} | {units(r.get('mlp'))} | {units(r.get('heads'))} | {units(r.get('kv_heads'))} "
                  + (f"| {units(r.get('experts'))} " if moe else "")
                  + f"| {r.get('removed') or '–'} | {r['params_before']:,} → {r['params_after']:,} "
                  f"| {r.get('fraction_removed', 0):.1%} |" for r in report.get("blocks", [])]
        return "\n".join(lines)
    lines = ["| layer | shape | params | non-zero | target | sparsity |", "|---|---:|---:|---:|---:|---:|"]
    for r in report.get("layers", []):
        sparsity = r.get("sparsity", 1 - r["nonzero"] / max(r["params"], 1))
        lines.append(f"| `{_cell(r['name'])}` | {'×'.join(str(s) for s in r['shape'])} | {r['params']:,} | "
                     f"{r['nonzero']:,} | {r['target_sparsity']:.1%} | {sparsity:.2%} |")
    return "\n".join(lines)


def _load_instructions(load_id: str, compressed: bool, per_layer: bool) -> tuple[str, str]:
    stock = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
             f'model = AutoModelForCausalLM.from_pretrained("{load_id}")\n'
             f'tokenizer = AutoTokenizer.from_pretrained("{load_id}")')
    if compressed:
        return ("The weights are stored compressed: install hf_prune (`pip install hf_prune`) and import it before "
                "loading; it registers the format with transformers, and the layers load as "
                "`hf_prune.nn.SparseLinear`. Without hf_prune, loading fails loudly (never with wrong weights).",
                "import hf_prune  # registers the compressed format\n" + stock)
    if per_layer:
        return ("Layers have different shapes after pruning: with hf_prune installed and imported, "
                "`from_pretrained` builds each layer at its own size.",
                "import hf_prune  # builds per-layer shapes\n" + stock)
    return ("A plain transformers checkpoint: stock transformers loads it, no hf_prune needed.", stock)


def _evaluation_text(evaluation: dict[str, Any]) -> str:
    parts = []
    ppl, dense = evaluation.get("perplexity"), evaluation.get("dense_perplexity")
    if ppl:
        line = (f"Perplexity **{ppl['ppl']:.3f}** on {ppl.get('windows')} held-out windows × {ppl.get('seqlen')} "
                f"tokens (`hf-prune prune --eval`)")
        parts.append(line + (f"; the model before pruning: {dense['ppl']:.3f}." if dense else "."))
    by_source = evaluation.get("perplexity_by_source") or {}
    if by_source:
        rows = ["| text | perplexity | windows × tokens |", "|---|---:|---|"]
        rows += [f"| {_cell(name)} | {r['ppl']:.3f} | {r.get('windows')} × {r.get('seqlen')} |"
                 for name, r in by_source.items()]
        parts.append("Perplexity per held-out text (`hf-prune eval --text NAME=FILE ...`):\n\n" + "\n".join(rows))
    tasks = evaluation.get("lm_eval") or {}
    if tasks:
        limit = (evaluation.get("lm_eval_config") or {}).get("limit")
        head = "lm-evaluation-harness (`hf-prune eval --tasks`" + (f", limit {limit}" if limit else "") + "):"
        rows = ["| task | metric | value |", "|---|---|---:|"]
        for task, metrics in tasks.items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)) and "stderr" not in metric:
                    rows.append(f"| {task} | {metric} | {value:.4f} |")
        parts.append(head + "\n\n" + "\n".join(rows))
    return "\n\n".join(parts)


def _eval_results(evaluation: dict[str, Any]) -> list[Any]:
    """``model-index`` entries (`huggingface_hub.EvalResult`) for the stored evaluation."""
    from huggingface_hub import EvalResult

    out = []
    ppl = evaluation.get("perplexity")
    if ppl and isinstance(ppl.get("ppl"), (int, float)):
        out.append(EvalResult(task_type="text-generation", dataset_type="held-out-text", dataset_name="held-out text",
                              metric_type="perplexity", metric_value=round(float(ppl["ppl"]), 4)))
    for task, metrics in (evaluation.get("lm_eval") or {}).items():
        for metric, value in metrics.items():
            if isinstance(value, (int, float)) and "stderr" not in metric:
                out.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                      metric_type=metric.split(",")[0], metric_name=metric,
                                      metric_value=round(float(value), 4)))
    return out
