"""Checkpoints: one directory per save, written whole into a temp directory and renamed into place.

Layout of ``<root>/step_00001000/``::

    model.safetensors    backbone weights (every tensor of ``model.state_dict()`` but the tables')
    table.<name>.rows-<start>-<stop>.safetensors
                         row-range files, one per table (``model.memory_tables()``) here: the rows
                         [start, stop) as "weight" and, beside them, the optimizer's row state for them
                         ("exp_avg", "exp_avg_sq", ...; scalars such as "step" in the metadata), so a
                         sharded run saves each shard's range and any world size can read any range
    optimizer.pt         the optimizer's state without the tables' (torch.save; loaded weights_only)
    rng.pt               python ``random``, numpy global and torch (CPU + CUDA) RNG states
    trainer.json         {"step": int, "trainer": caller's dict (tokens seen, loader position, metrics)}
    config.json          the run's config dict, checked on load
    <extra files>        whatever the caller passes (tokenizer.json, compression map, hash layout)
    manifest.json        format version, hash layout fingerprint, table keys, tied-weight aliases, size +
                         sha256 per file

``<root>/latest`` is a one-line pointer to the newest directory, replaced atomically.

Guarantees:
  * Atomic: files go into ``<root>/.tmp-<name>-<pid>-<rand>/``, each fsynced, the directory fsynced,
    then renamed to ``<root>/<name>`` and the root fsynced; only then is ``latest`` updated and old
    checkpoints pruned (``keep_last``). A kill at any instant leaves the previous checkpoint loadable;
    a stale temp directory from a dead writer is removed by the next save. If ``latest`` names a
    directory that is gone, ``latest_checkpoint`` falls back to the newest complete one.
  * A failed write (disk full, ...) removes the temp directory and raises ``OSError`` with the same errno,
    naming the checkpoint and file; earlier checkpoints are not touched.
  * Load checks, before touching the model: config (``ValueError`` listing differing fields), the hash
    layout (always: the checkpoint's fingerprint against the model's own ``hash_fingerprint()``, naming
    the differing layout fields), every file's size (truncation) and sha256 (corruption), manifest file
    names (plain names only), safetensors readability (error names the file), and missing / unexpected /
    mis-shaped model keys.
  * One writer per root. Saving weights holds a serialised copy of each safetensors file in memory.

Tied weights (one tensor under two state-dict keys) are stored once and re-aliased on load.

Sharded tables (engram.dist): with ``comm``, every rank writes the row ranges it holds into the one temp
directory rank 0 made; the ranks then exchange what they wrote (a barrier that carries any rank's write
failure to every rank, each of which raises), and rank 0 alone writes the manifest (every rank's ranges
and file hashes) and renames. On load each process reads the rows of its own range from whichever files
cover them, so a checkpoint saved at one world size loads at any other; the ranges of every table must
tile its rows exactly (an incomplete shard set is refused by every rank alike), and each process checks
the sha256 of the files it reads.

Format versions: 2 (row-range table files, above); 1 (every table in ``tables.safetensors`` and its state
inside optimizer.pt) still loads.
"""

from __future__ import annotations

import errno as errno_mod
import json
import os
import random
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import safetensors.torch
import torch
from torch import nn

from engram import io as eio
from engram.config import diff_configs
from engram.memory import memory_tables
from engram.memory.layout import TableLayout, TableLayoutError
from engram.memory.store import ReadOnlyTableError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MODEL_FILE = "model.safetensors"
TABLES_FILE = "tables.safetensors"  # format 1 only
OPTIM_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
RESERVED = frozenset({MODEL_FILE, TABLES_FILE, OPTIM_FILE, RNG_FILE, TRAINER_FILE, CONFIG_FILE, MANIFEST_FILE})
HASH_LAYOUT_FILE = "hash_layout.json"  # written by save_checkpoint for models that hash
_STEP_DIR = re.compile(r"^step_(\d+)$")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this run: wrong config/layout, corrupt or incomplete files."""


@dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` restored besides the model and optimiser."""

    path: Path
    step: int
    trainer_state: dict[str, Any]
    config: dict[str, Any]
    fingerprint: str | None
    files: dict[str, Path] = field(default_factory=dict)  # extra files by name


# ------------------------------------------------------------------------------------------- naming


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``root`` (those with a manifest), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / MANIFEST_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The directory ``<root>/latest`` names, or the newest complete one if that is missing; None if none."""
    root = Path(root)
    try:
        name = (root / LATEST_FILE).read_text().strip()
    except OSError:
        name = ""
    if name and _STEP_DIR.match(name) and (root / name / MANIFEST_FILE).is_file():
        return root / name
    done = list_checkpoints(root)
    return done[-1] if done else None


# -------------------------------------------------------------------------------------------- state


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_fingerprint(model: nn.Module) -> str | None:
    """The hash layout fingerprint of a model (None for a model without hashed memory)."""
    getter = getattr(model, "hash_fingerprint", None)
    return getter() if getter is not None else None


def _model_layout(model: nn.Module) -> dict[str, Any] | None:
    getter = getattr(model, "hash_layout", None)
    return getter() if getter is not None else None


def _tables(model: nn.Module) -> dict[str, tuple[str, Any]]:
    """Memory tables by name -> (state-dict key of their rows, the table); refuses a read-only tier."""
    keys = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out = {}
    for name, table in memory_tables(model).items():
        if not table.trainable:
            raise ReadOnlyTableError(f"table {name!r} lives on the read-only {table.tier} tier; a checkpoint "
                                     "needs every table's rows in memory (place it on the device or host tier)")
        out[name] = (keys[id(table.weight)], table)
    return out


def _split_state(model: nn.Module, table_keys: set[str]):
    """state_dict without the tables -> (tensors, aliases {key: stored key}), all CPU + contiguous."""
    sd = model.state_dict()
    stored: dict[tuple, str] = {}
    seen_storage: set[int] = set()
    backbone, aliases = {}, {}
    for k, t in sd.items():
        if k in table_keys:
            continue
        t = t.detach()
        view = None
        if t.numel():
            view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if view is not None and view in stored:
            aliases[k] = stored[view]  # tied weight: store once
            continue
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr in seen_storage:
            t = t.clone()  # a different view of a shared storage: safetensors needs it standalone
        if view is not None:
            stored[view] = k
            seen_storage.add(ptr)
        backbone[k] = t.cpu().contiguous()
    return backbone, aliases


def range_file_name(table: str, start: int, stop: int) -> str:
    return f"table.{table}.rows-{start}-{stop}.safetensors"


def _row_range_payload(table: Any, optimizer: Any | None):
    """A writer of the rows ``table.weight`` holds (rows ``table.row_range`` of the whole table: all of
    them, or a shard's) and the optimizer's row state for them (moments stay beside their rows)."""
    w = table.weight.detach()
    start, stop = table.row_range
    tensors = {"weight": w.cpu().contiguous()}
    scalars: dict[str, Any] = {}
    state = optimizer.param_state(table.weight) if optimizer is not None and hasattr(optimizer, "param_state") else {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == w.shape[0]:
            tensors[k] = v.cpu().contiguous()
        elif isinstance(v, torch.Tensor):
            scalars[k] = v.item()
        else:
            scalars[k] = v
    meta = {"table": table.layout.name, "start": str(start), "stop": str(stop), "rows": str(table.num_rows),
            "optimizer_scalars": json.dumps(scalars), "layout": json.dumps(table.layout.to_dict(), sort_keys=True)}
    return lambda: safetensors.torch.save(tensors, metadata=meta)


# --------------------------------------------------------------------------------------------- save


def _json_bytes(obj: Any, what: str) -> bytes:
    try:
        return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint {what} must be JSON-serialisable: {e}") from None


def _remove_stale_temps(root: Path) -> None:
    for d in root.glob(".tmp-*"):
        parts = d.name.rsplit("-", 2)
        try:
            pid = int(parts[-2])
        except (IndexError, ValueError):
            continue
        alive = pid != os.getpid()
        if alive:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:
                pass
        if not alive:
            shutil.rmtree(d, ignore_errors=True)


def _optimizer_state(optimizer: Any, table_params: list) -> Any:
    """The optimizer's state without the tables' per-row state (that lives in the row-range files)."""
    if hasattr(optimizer, "param_state"):
        return optimizer.state_dict(without=table_params)
    return optimizer.state_dict()


class _Solo:
    """The collectives of a single process (``comm`` of ``save_checkpoint``): trivial."""

    rank, world_size = 0, 1

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj


class _SaveFailed(Exception):
    """A failure of one rank's part of a save, carried to the others: (errno, message)."""


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: Any | None,
    config: Mapping[str, Any],
    trainer_state: Mapping[str, Any] | None = None,
    *,
    extra_files: Mapping[str, bytes | os.PathLike | Mapping[str, Any]] | None = None,
    keep_last: int | None = 3,
    comm: Any | None = None,
) -> Path:
    """Write ``<root>/step_<step>`` atomically, point ``latest`` at it, prune to ``keep_last``; return it.

    ``optimizer`` is anything with ``state_dict()`` (an ``EngramOptimizer``) or None. ``trainer_state``
    and ``config`` must be JSON-serialisable. ``extra_files`` maps a plain file name to bytes, a path to
    copy, or a dict written as JSON. Tables (``model.memory_tables()``) go into row-range files with
    their optimizer state. The model's hash layout (if it has one) is recorded from the model.

    ``comm`` (an ``engram.dist.Runtime``; None: this process alone) makes the save collective: every rank
    calls it, writes the row ranges of the table shards it holds into one temporary directory that rank 0
    made, the ranks exchange what they wrote (a barrier that also carries any rank's failure to all),
    then rank 0 alone writes the manifest and renames the directory into place. Every rank raises if any
    rank failed; rank 0 writes the backbone, optimizer, RNG and extra files.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    comm = comm if comm is not None else _Solo()
    main = comm.rank == 0
    root = Path(root)
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if not _NAME_OK.match(name) or name in RESERVED or name in (LATEST_FILE, HASH_LAYOUT_FILE):
            raise ValueError(f"bad extra file name {name!r}: plain names only, not one of {sorted(RESERVED)}")
    # serialise the small things first so a bad value fails before anything is written
    config_bytes = _json_bytes(dict(config), "config")
    trainer_bytes = _json_bytes({"step": int(step), "trainer": dict(trainer_state or {})}, "trainer_state")
    tables = _tables(model)
    payloads, table_files = _table_payloads(tables, optimizer)
    aliases: dict[str, str] = {}
    if main:  # the order of files is that of format 1, which fault-injection tests count on
        head, tail, aliases = _main_payloads(model, optimizer, tables, config_bytes, trainer_bytes, extra_files)
        payloads = head + payloads + tail
    name = checkpoint_name(step)
    final = root / name
    tmp = _make_temp(root, name, comm)
    files, table_files = _write_parts(tmp, payloads, table_files, final, root, comm)
    err: BaseException | None = None
    if main:
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "fingerprint": model_fingerprint(model),
            "tables": table_files,
            "aliases": aliases,
            "extra_files": sorted(set(extra_files) | ({HASH_LAYOUT_FILE} if _model_layout(model) is not None else set())),
            "files": files,
            "created_unix": time.time(),
        }
        if comm.world_size > 1:
            manifest["world_size"] = comm.world_size
        try:
            _publish(root, tmp, final, manifest, keep_last)
        except BaseException as e:  # noqa: BLE001 - told to the other ranks, then re-raised
            err = e
    status = comm.broadcast_object(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    if status is not None:
        raise OSError(errno_mod.EIO, f"saving checkpoint {final} failed on rank 0: {status}")
    return final


def _table_payloads(tables: dict[str, tuple[str, Any]], optimizer: Any | None):
    """This rank's row-range files: [(file name, writer)] and the manifest entry of each table."""
    payloads, entries = [], {}
    for tname, (key, table) in tables.items():
        start, stop = table.row_range
        fname = range_file_name(tname, start, stop)
        entries[tname] = {"key": key, "rows": table.num_rows, "ranges": [[start, stop, fname]],
                          "layout": table.layout.to_dict()}
        payloads.append((fname, _row_range_payload(table, optimizer)))
    return payloads, entries


def _main_payloads(model, optimizer, tables, config_bytes: bytes, trainer_bytes: bytes, extra_files: dict[str, Any]):
    """What rank 0 writes besides its table rows: (config, trainer state, backbone, RNG), (optimizer,
    extras), and the tied-weight aliases."""
    backbone, aliases = _split_state(model, {key for key, _ in tables.values()})
    table_params = [t.weight for _, t in tables.values()]
    meta = {"format": "pt", "engram_aliases": json.dumps(aliases, sort_keys=True)}
    head: list[tuple[str, Any]] = [
        (CONFIG_FILE, config_bytes),
        (TRAINER_FILE, trainer_bytes),
        (MODEL_FILE, lambda: safetensors.torch.save(backbone, metadata=meta)),
        (RNG_FILE, lambda: (lambda f: torch.save(_rng_state(), f))),
    ]
    payloads: list[tuple[str, Any]] = []
    if optimizer is not None:
        payloads.append((OPTIM_FILE, lambda: (lambda f: torch.save(_optimizer_state(optimizer, table_params), f))))
    layout = _model_layout(model)
    extras = dict(extra_files)
    if layout is not None:
        extras[HASH_LAYOUT_FILE] = layout
    for fname, value in extras.items():
        if isinstance(value, (bytes, bytearray)):
            payloads.append((fname, bytes(value)))
        elif isinstance(value, Mapping):
            payloads.append((fname, _json_bytes(dict(value), f"extra file {fname}")))
        elif isinstance(value, os.PathLike):
            payloads.append((fname, Path(value).read_bytes()))
        else:
            raise TypeError(f"extra file {fname!r}: give bytes, a path or a dict, not {type(value).__name__}")
    return head, payloads, aliases


def _make_temp(root: Path, name: str, comm: Any) -> Path:
    """Rank 0 makes ``<root>/.tmp-<name>-<pid>-<rand>`` (after removing dead writers' ones); all get its path."""
    tmp, err = None, None
    if comm.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(root)
            tmp = root / f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
            tmp.mkdir()
        except OSError as e:
            err = e
    got = comm.broadcast_object(str(tmp) if err is None else f"!{err}")
    if err is not None:
        raise err
    if got.startswith("!"):
        raise OSError(errno_mod.EIO, f"saving checkpoint {root / name} failed on rank 0: {got[1:]}")
    return Path(got)


def _write_parts(tmp: Path, payloads, table_files: dict, final: Path, root: Path, comm: Any):
    """Every rank writes its payloads into ``tmp``; then all exchange (files written, table ranges) or
    the failure of any rank, so every rank raises on a failure anywhere. Returns the merged
    ({file: size and sha256}, {table: manifest entry with every rank's ranges})."""
    files: dict[str, Any] = {}
    current, failure = MODEL_FILE, None
    try:
        for fname, data in payloads:
            current = fname
            eio.write_synced(tmp / fname, data() if callable(data) else data)
            files[fname] = {"bytes": (tmp / fname).stat().st_size, "sha256": eio.sha256_file(tmp / fname)}
            eio.fault_point(f"checkpoint.file:{fname}")
    except OSError as e:
        failure = e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    mine = (files, table_files) if failure is None else (failure.errno, f"{current}: {failure.strerror or failure}")
    parts = comm.all_gather_object(mine)
    bad = [(r, p) for r, p in enumerate(parts) if not isinstance(p[0], dict)]
    if bad:
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise OSError(failure.errno, f"saving checkpoint {final} failed at {current}: {failure.strerror or failure}; "
                          f"earlier checkpoints in {root} are untouched") from failure
        r, (code, what) = bad[0]
        raise OSError(code, f"saving checkpoint {final} failed on rank {r} at {what}; earlier checkpoints in {root} "
                      "are untouched")
    merged_files: dict[str, Any] = {}
    merged_tables: dict[str, Any] = {}
    for f, t in parts:
        merged_files.update(f)
        for tname, entry in t.items():
            if tname in merged_tables:
                merged_tables[tname]["ranges"] += entry["ranges"]
            else:
                merged_tables[tname] = {**entry, "ranges": list(entry["ranges"])}
    for entry in merged_tables.values():
        entry["ranges"].sort()
    return merged_files, merged_tables


def _publish(root: Path, tmp: Path, final: Path, manifest: dict[str, Any], keep_last: int | None) -> None:
    """Rank 0: manifest, then the atomic rename into place, ``latest``, pruning."""
    name = final.name
    current = MANIFEST_FILE
    try:
        eio.write_synced(tmp / MANIFEST_FILE, _json_bytes(manifest, "manifest"))
        eio.fsync_dir(tmp)
        current = "(rename into place)"
        eio.fault_point("checkpoint.rename")
        old = None
        if final.exists():  # re-saving a step: swap, then delete the old copy
            old = root / f".tmp-old-{name}-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(final, old)
        os.rename(tmp, final)
        eio.fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(
            e.errno,
            f"saving checkpoint {final} failed at {current}: {e.strerror or e}; "
            f"earlier checkpoints in {root} are untouched",
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    eio.atomic_write(root / LATEST_FILE, name + "\n")
    if keep_last is not None:
        for d in list_checkpoints(root)[:-keep_last]:
            if d != final:
                shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------- load


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is unreadable or corrupt: {e}") from None


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: {e}") from None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: {e}") from None


def _check_manifest_names(path: Path, manifest: Mapping[str, Any]) -> None:
    """Every file a manifest names is a plain file name inside the checkpoint (no ``..``, no paths)."""
    names = list(manifest.get("files", {})) + list(manifest.get("extra_files", []))
    bad = [n for n in names if not isinstance(n, str) or not _NAME_OK.match(n)]
    if bad:
        raise CheckpointError(f"{path / MANIFEST_FILE}: file names must be plain names inside the checkpoint, got {bad}")


def _check_hash_layout(path: Path, manifest: Mapping[str, Any], model: nn.Module) -> None:
    """The checkpoint's hash layout must be the model's: rows are meaningless under another layout."""
    saved, own = manifest.get("fingerprint"), model_fingerprint(model)
    if saved == own:
        return
    detail = ""
    if (path / HASH_LAYOUT_FILE).is_file() and (layout := _model_layout(model)) is not None:
        diffs = diff_configs(_read_json(path / HASH_LAYOUT_FILE), _normalise(layout))
        detail = ": " + "; ".join(f"saved {d}" for d in diffs[:8]) if diffs else ""
    raise CheckpointError(
        f"checkpoint {path} was trained under another hash layout (fingerprint {saved!r}, the model's is "
        f"{own!r}){detail}; its tables would be read at the wrong rows"
    )


def _normalise(d: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(d)))  # tuples -> lists, as in the saved JSON


def _table_modules(model: nn.Module) -> dict[str, tuple[str, Any]]:
    """Memory tables by name -> (state-dict key of their rows, table), whatever their tier."""
    path_of = {id(m): n for n, m in model.named_modules()}
    return {name: (f"{path_of[id(t)]}.weight", t) for name, t in memory_tables(model).items()}


def _load_tables(path: Path, manifest: Mapping[str, Any], model: nn.Module):
    """(state-dict tensors of the model's in-memory tables, [(parameter, optimizer row state)])."""
    own = _table_modules(model)
    on_disk = {key for key, t in own.values() if not t.trainable}
    if manifest.get("format_version") == 1:
        tensors, _ = _load_safetensors(path / TABLES_FILE)
        return {k: v for k, v in tensors.items() if k not in on_disk}, []
    saved = manifest.get("tables", {})
    unknown = sorted(set(saved) - set(own))
    if unknown:
        raise CheckpointError(f"checkpoint {path} holds tables {unknown} this model does not have")
    tensors, states = {}, []
    for name, (key, table) in own.items():
        if not table.trainable:
            continue
        if name not in saved:
            raise CheckpointError(f"checkpoint {path} has no rows for table {name!r}")
        try:
            table.layout.check_same_rows(TableLayout.from_dict(saved[name]["layout"]), f"checkpoint {path}")
        except TableLayoutError as e:
            raise CheckpointError(str(e)) from None
        _check_ranges(path, name, saved[name], table.num_rows)
        rows, scalars = read_table_rows(path, saved[name], *table.row_range)
        tensors[key] = rows.pop("weight")
        if rows or scalars:
            states.append((table.weight, {**scalars, **rows}))
    return tensors, states


def _check_ranges(path: Path, name: str, entry: Mapping[str, Any], num_rows: int) -> None:
    """A table's row-range files must tile [0, rows) exactly, whichever part this process reads: an
    incomplete set of shards (a rank's file lost) is refused by every rank alike."""
    at = 0
    for a, b, fname in sorted((int(a), int(b), f) for a, b, f in entry["ranges"]):
        if a != at:
            what = f"rows [{at}, {a}) are in no file" if a > at else f"rows [{a}, {min(at, b)}) are in two files"
            raise CheckpointError(f"checkpoint {path}: incomplete or inconsistent shard set for table {name!r}: {what}")
        at = b
    if at != num_rows:
        raise CheckpointError(f"checkpoint {path}: incomplete shard set for table {name!r}: rows [{at}, {num_rows}) "
                              "are in no file")


def _files_read_here(manifest: Mapping[str, Any], model: nn.Module) -> set[str]:
    """The checkpoint files this process reads: all but the row-range files outside its tables' ranges."""
    files = set(manifest.get("files", {}))
    if manifest.get("format_version") != 2:
        return files
    for name, (_, table) in _table_modules(model).items():
        entry = manifest.get("tables", {}).get(name)
        if entry is None or not table.trainable:
            continue
        lo, hi = table.row_range
        files -= {f for a, b, f in entry["ranges"] if int(b) <= lo or int(a) >= hi}
    return files


def read_table_rows(path: Path, entry: Mapping[str, Any], start: int, stop: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Rows [start, stop) of one table (weight and optimizer row state) from whichever row-range files
    of checkpoint ``path`` cover them; refuses gaps and overlaps. Returns (tensors, optimizer scalars)."""
    ranges = sorted((int(a), int(b), f) for a, b, f in entry["ranges"])
    covered, parts, scalars = start, [], {}
    for a, b, fname in ranges:
        if b <= covered or a >= stop:
            continue
        if a > covered:
            raise CheckpointError(f"checkpoint {path}: rows [{covered}, {a}) of table {entry.get('key')} are in no file")
        tensors, meta = _load_safetensors(path / fname)
        lo, hi = covered - a, min(b, stop) - a
        parts.append({k: v[lo:hi] for k, v in tensors.items()})
        scalars = json.loads(meta.get("optimizer_scalars", "{}"))
        covered = min(b, stop)
    if covered < stop:
        raise CheckpointError(f"checkpoint {path}: rows [{covered}, {stop}) of table {entry.get('key')} are in no file")
    keys = set(parts[0]) if parts else {"weight"}
    if any(set(p) != keys for p in parts):
        raise CheckpointError(f"checkpoint {path}: row-range files of table {entry.get('key')} hold different tensors")
    return {k: torch.cat([p[k] for p in parts]) for k in keys}, scalars


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: Any | None,
    expected_config: Mapping[str, Any] | None,
    *,
    restore_rng: bool = True,
    verify: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint directory (or the latest under a root) into ``model`` and ``optimizer``.

    Refuses (``CheckpointError``, a ``ValueError``), before changing anything, a checkpoint whose config
    differs from ``expected_config`` (listing the fields; None skips the check), whose hash layout differs
    from the model's (always checked), whose files are truncated or corrupt (naming the file;
    ``verify=False`` skips the sha256 pass but not the size check), or whose keys do not match the model.
    ``optimizer=None`` skips optimiser state. ``restore_rng`` restores python/numpy/torch RNG states.
    """
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint at {path} (no {MANIFEST_FILE}, no complete step_* directory)")
        path = found
    manifest = _read_json(path / MANIFEST_FILE)
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format {manifest.get('format_version')}; this engram reads {READABLE_VERSIONS}"
        )

    # 1. files: plain names, present, full length, unchanged (the sha256 of those this process reads: a
    #    shard of a sharded model skips the other shards' rows)
    _check_manifest_names(path, manifest)
    read_here = _files_read_here(manifest, model)
    for fname, info in manifest["files"].items():
        fpath = path / fname
        if not fpath.is_file():
            raise CheckpointError(f"checkpoint file missing: {fpath}")
        size = fpath.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint file {fpath} is truncated or altered: {size} bytes, manifest says {info['bytes']}"
            )
        if verify and fname in read_here and eio.sha256_file(fpath) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {fpath} is corrupt: sha256 does not match the manifest")

    # 2. same run: config and hash layout
    config = _read_json(path / CONFIG_FILE)
    if expected_config is not None:
        diffs = diff_configs(_normalise(expected_config), config)
        if diffs:
            raise CheckpointError(
                f"checkpoint {path} was saved with a different config (expected != saved): " + "; ".join(diffs)
            )
    fingerprint = manifest.get("fingerprint")
    _check_hash_layout(path, manifest, model)

    # 3. weights: exactly the model's keys and shapes (tables on a read-only tier keep their own rows)
    backbone, meta = _load_safetensors(path / MODEL_FILE)
    tables, table_states = _load_tables(path, manifest, model)
    sd = {**backbone, **tables}
    for k, src in json.loads(meta.get("engram_aliases", "{}")).items():
        if src not in sd:
            raise CheckpointError(f"{path / MODEL_FILE}: alias {k} -> {src} names no stored tensor")
        sd[k] = sd[src]
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [
        f"{k}: saved {tuple(sd[k].shape)} != model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing keys {missing}, unexpected keys {unexpected}, "
            f"shape mismatches {shapes}"
        )
    opt_state = None
    if optimizer is not None:
        if OPTIM_FILE not in manifest["files"]:
            raise CheckpointError(f"checkpoint {path} has no optimizer state ({OPTIM_FILE})")
        opt_state = _torch_load(path / OPTIM_FILE)
    rng = _torch_load(path / RNG_FILE) if restore_rng else None
    trainer = _read_json(path / TRAINER_FILE)

    # 4. apply (all checks passed)
    model.load_state_dict(sd, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
        for param, state in table_states:
            optimizer.load_param_state(param, state)
    if rng is not None:
        _set_rng_state(rng)
    return LoadedCheckpoint(
        path=path,
        step=int(trainer["step"]),
        trainer_state=trainer.get("trainer", {}),
        config=config,
        fingerprint=fingerprint,
        files={n: path / n for n in manifest.get("extra_files", [])},
    )


__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "LoadedCheckpoint",
    "checkpoint_name",
    "list_checkpoints",
    "latest_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "range_file_name",
    "read_table_rows",
]
