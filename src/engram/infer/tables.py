"""A run's tables as row files: export (any row dtype), inspect, verify, and the quality of quantized rows.

``export_tables`` streams each table of a trained run into ``<dir>/<table>.rows`` (engram.memory.rowfile),
atomically; ``load_run(..., placement=Placement("disk", dir))`` serves a model from them.
``check_quantized`` answers what a user of 8-bit tables needs before trusting them: held-out loss and
the mean KL divergence of next-token distributions against the full-precision table, and bytes saved.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from engram.data.corpora import default_cache_dir, prepare
from engram.data.loader import EvalLoader
from engram.data.shards import prepare_tokens
from engram.infer.run import LoadedRun, load_run
from engram.memory.rowfile import ROW_FORMATS, RowFileReader, read_header, write_rowfile
from engram.memory.placement import Placement
from engram.memory.store import rowfile_name
from engram.runtime import autocast


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", unit_scale=True, disable=not enabled, dynamic_ncols=True)


def export_tables(run: str | Path, out_dir: str | Path, dtype: str = "fp32", progress: bool = True,
                  loaded: LoadedRun | None = None) -> list[Path]:
    """Write every table of ``run`` as ``out_dir/<table>.rows`` in row dtype ``dtype`` (fp32, bf16, fp8,
    int8); each file is written atomically (an interrupted export leaves any older file intact)."""
    if dtype not in ROW_FORMATS:
        raise ValueError(f"row dtype must be one of {', '.join(ROW_FORMATS)}, got {dtype!r}")
    lr = loaded if loaded is not None else load_run(run)
    tables = lr.model.memory_tables()
    if not tables:
        raise ValueError(f"run {run} has no memory tables to export")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in tables.items():
        w = table.weight.detach()
        with _bar(table.num_rows, f"export {name} ({dtype})", progress) as bar:
            write_rowfile(out_dir / rowfile_name(name), table.layout, lambda a, b: w[a:b].cpu(), dtype,
                          {"run": str(run), "step": lr.step}, progress=bar.update)
        written.append(out_dir / rowfile_name(name))
    return written


def table_info(path: str | Path) -> dict[str, Any]:
    """What a row file's header says (checked: magic, version, header checksum, size)."""
    h = read_header(path)
    lay = h.layout
    return {"file": str(path), "table": lay.name, "rows": lay.num_rows, "heads": lay.num_heads,
            "head_sizes": list(lay.head_sizes), "row_width": lay.d_head, "train_dtype": lay.dtype,
            "format": h.fmt.describe(), "bytes": h.file_size,
            "page_use": round(h.fmt.records_per_page * h.fmt.record_size / 4096, 4) if h.fmt.records_per_page else
            round(h.fmt.record_size / (h.fmt.pages_per_record * 4096), 4),
            "hash_fingerprint": lay.hash_fingerprint, "source": h.source}


def verify_table(path: str | Path, chunk_rows: int = 1 << 16, progress: bool = True) -> dict[str, Any]:
    """Read and check every record; the first bad one raises ``RowFileError`` naming the row."""
    with RowFileReader(path, io="mmap") as reader, _bar(reader.header.num_rows, f"verify {Path(path).name}", progress) as bar:
        for _, rows in reader.iter_rows(chunk_rows):
            bar.update(len(rows))
        return {"file": str(path), "rows": reader.header.num_rows, "ok": True}


@torch.no_grad()
def check_quantized(run: str | Path, dtype: str = "fp8", corpus: str | None = None, batches: int = 16,
                    batch_size: int = 8, cache_dir: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Held-out loss and mean next-token KL(full precision || ``dtype`` rows), over the same batches, and
    the bytes of each table file. ``corpus`` defaults to the run's training corpus (its validation split)."""
    full = load_run(run)
    corpus = corpus or full.config["train"]["corpus"]
    with tempfile.TemporaryDirectory() as tmp:
        ref_files = export_tables(run, Path(tmp) / "fp32", "fp32", progress, loaded=full)
        q_files = export_tables(run, Path(tmp) / dtype, dtype, progress, loaded=full)
        quant = load_run(run, placement=Placement("disk", Path(tmp) / dtype, io="mmap"))
        res = _compare(full, quant, corpus, batches, batch_size, cache_dir)
        for t in quant.model.memory_tables().values():
            t.store.close()
        res.update(dtype=dtype, corpus=corpus, table_bytes_fp32=sum(f.stat().st_size for f in ref_files),
                   table_bytes=sum(f.stat().st_size for f in q_files),
                   table_bytes_in_memory=full.model.table_bytes())
    res["bytes_saved"] = 1 - res["table_bytes"] / res["table_bytes_fp32"]
    return res


def _compare(full: LoadedRun, quant: LoadedRun, corpus: str, batches: int, batch_size: int,
             cache_dir: str | Path | None) -> dict[str, Any]:
    c = prepare(corpus, Path(cache_dir) if cache_dir else default_cache_dir())
    split = "val" if c.documents_of("val") else "train"
    data = prepare_tokens(c, full.tokenizer, cache_dir, (split,))[split]
    T = full.config["train"]["seq_len"]
    loader = EvalLoader(data, batch_size, T, batches, hash_fn=full.model.hash, source=f"{corpus} ({split})")
    dtype = full.config["train"]["dtype"]
    sums = {"full": 0.0, "quant": 0.0, "kl": 0.0}
    n = 0
    for batch in loader:
        mask = batch.targets != -100
        k = int(mask.sum())
        logp = {}
        for name, lr in (("full", full), ("quant", quant)):
            with autocast(dtype):
                out = lr.model(batch.ids, batch.segment_ids, batch.hash_ids, batch.targets)
            sums[name] += float(out.ce_loss) * k
            logp[name] = out.logits.float().log_softmax(-1)[mask]
        sums["kl"] += float((logp["full"].exp() * (logp["full"] - logp["quant"])).sum())
        n += k
    return {"tokens": n, "loss_fp32": sums["full"] / n, "loss": sums["quant"] / n,
            "loss_delta": (sums["quant"] - sums["full"]) / n, "mean_kl": sums["kl"] / n,
            "ppl_fp32": math.exp(min(sums["full"] / n, 50)), "ppl": math.exp(min(sums["quant"] / n, 50))}


def hotness(run: str | Path, corpus: str, out: str | Path, max_tokens: int | None = None,
            cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Count how often each table row is looked up over ``corpus``'s training split only (never its
    held-out text), and save it for the static cache policy (``--cache-policy static --hotness FILE``)."""
    from engram.memory.hotness import row_hotness

    lr = load_run(run)
    hot = row_hotness(lr, corpus, "train", cache_dir=cache_dir, max_tokens=max_tokens)
    hot.save(out)
    touched = {layer: f"{len(hot.rows[layer]):,} of {hot.num_rows[layer]:,}" for layer in hot.layers}
    return {"tokens": int(hot.source.get("tokens", 0)), "touched": touched}


__all__ = ["check_quantized", "export_tables", "hotness", "table_info", "verify_table"]
