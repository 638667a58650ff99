"""Tests for engram.data.bpe: byte-level BPE trained on real text (a ~1 MB slice of ``mini``)."""

from __future__ import annotations

import pytest
from test_data_corpora import prepare_or_skip
from tokenizers import Tokenizer, models

from engram.data.bpe import EOT, eot_id, load_tokenizer, tokenizer_fingerprint, train_bpe, train_corpus_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return prepare_or_skip("mini", tmp_path_factory.mktemp("mini"))


@pytest.fixture(scope="module")
def tok_path(mini, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_corpus_tokenizer(mini, 512, path, max_bytes=1_000_000)
    return path


def test_trained_tokenizer_round_trips_text(tok_path, mini):
    tok = load_tokenizer(tok_path)
    assert tok.get_vocab_size() == 512 and eot_id(tok) == 0 and tok.id_to_token(0) == EOT
    for doc in mini.documents_of("val")[:5]:  # held-out text, prose and code
        text = doc.text[:20_000]
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
        assert len(ids) < len(text.encode()) * 0.75  # it actually learned merges
    odd = "naïve café — 東京 🙂\ttabs\r\n  trailing   \x00"
    assert tok.decode(tok.encode(odd).ids) == odd  # every byte is in the alphabet: no <unk>, exact


def test_tokenizer_file_is_written_atomically(tok_path):
    assert not list(tok_path.parent.glob("*.tmp"))
    assert Tokenizer.from_file(str(tok_path)).to_str() == load_tokenizer(tok_path).to_str()


def test_training_is_deterministic(mini):
    texts = [d.text for d in mini.documents_of("train")]
    a = train_bpe(texts, 300, max_bytes=300_000)
    b = train_bpe(texts, 300, max_bytes=300_000)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


def test_vocab_size_below_byte_alphabet_is_refused():
    with pytest.raises(ValueError, match="byte alphabet"):
        train_bpe(["hello"], 100)


def test_foreign_tokenizer_without_eot_is_named(tmp_path):
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.add_special_tokens(["[SEP]"])
    tok.save(str(tmp_path / "t.json"))
    with pytest.raises(ValueError, match=r"no '<\|endoftext\|>' token; its special tokens are \['\[SEP\]'\]"):
        eot_id(load_tokenizer(tmp_path / "t.json"))
    assert eot_id(load_tokenizer(tmp_path / "t.json"), "[SEP]") == 2
    with pytest.raises(FileNotFoundError, match="no tokenizer.json at .*missing.json"):
        load_tokenizer(tmp_path / "missing.json")


def test_eval_only_corpus_has_nothing_to_train_on(mini):
    from engram.data.corpora import Corpus

    with pytest.raises(ValueError, match="no training documents"):
        train_corpus_tokenizer(Corpus("x", mini.documents[:3], 1.0), 300)
