"""``engram bench cache``: hit rate of every row-cache policy against cache size, on held-out real text.

Two hash layouts (hashing needs only token ids, so neither needs a trained model):

* ``tiny``: the demo's layout (preset ``tiny``: one Engram layer at block 1, orders 2-3 x 2 heads, 145,808
  rows), with the demo's tokenizer (byte-level BPE of 8,192 ids trained on ``mini``);
* ``paper``: ``engram-27b``'s Engram config with DeepSeek's tokenizer, layer 1 (orders 2-3 x 8 heads,
  35,618,218 rows; layer 15 has the same statistics under other hashes).

The stream is held-out text (``brown`` and ``sympy``, evaluation-only corpora) served as ``lanes``
sequences decoding side by side, one token each per step (``engram.memory.cache_sim.lane_stream``); a row
counts once per step and the previous step's rows are protected, as the prefetching store will run.
Caches of 0.1%, 1% and 10% of the layer's rows, each starting empty, for every policy beside Belady's
offline optimum (an upper bound: it ignores the pin rules), the compulsory ceiling (first touches miss
in any cache that starts empty) and ``static-oracle``: the static policy ranked by the stream's own counts,
i.e. what perfect knowledge of future frequencies (but not of timing) buys. The static policy ranks rows by hotness counted on *training* splits
(tiny: ``mini``, the demo's training corpus; paper: ``en`` and ``code``). The simulator's speed (row
accesses per second, per policy) is measured on the same runs.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np

from engram.report import format_table

POLICY_NAMES = ("lru", "lfu", "lfu-aging", "tinylfu", "static")
FRACTIONS = (0.001, 0.01, 0.1)


@dataclass(frozen=True)
class LayoutSpec:
    """What one layout's benchmark hashes, counts and replays."""

    description: str
    preset: str
    hot_corpora: tuple[str, ...]  # training splits the static policy's hotness is counted on
    lanes: int  # sequences decoding side by side
    eval_tokens: int  # tokens of held-out text replayed (at least 10x the largest cache in row accesses)


LAYOUTS = {
    "tiny": LayoutSpec("demo layout (preset tiny, BPE 8192 trained on mini)", "tiny", ("mini",), 16, 1_000_000),
    "paper": LayoutSpec("paper layout (engram-27b, DeepSeek tokenizer)", "engram-27b", ("en", "code"), 64, 2_500_000),
}

QUICK = dict(layouts=("tiny",), eval_corpora=("mini",), eval_tokens=30_000, hot_tokens=200_000, tiny_vocab=512,
             tiny_tokenizer_bytes=2_000_000)


def _hasher_and_tokenizer(name: str, cache_dir: Path, tiny_vocab: int, tiny_tokenizer_bytes: int):
    from engram.config import preset
    from engram.hashing import NgramHasher
    from engram.tokenizer import CompressionMap, deepseek_tokenizer_path, load_tokenizer
    from engram.train.trainer import corpus_tokenizer, fit_model_config

    spec = LAYOUTS[name]
    if name == "paper":
        tok = load_tokenizer(deepseek_tokenizer_path())
        cfg = preset(spec.preset)
    else:  # the demo's tokenizer recipe, its separator as the pad id
        tok = corpus_tokenizer("mini", tiny_vocab, cache_dir, tiny_tokenizer_bytes)
        cfg = fit_model_config(preset(spec.preset), tok)
    hasher = NgramHasher.from_config(cfg.engram, CompressionMap.build(tok).lookup)
    return hasher, tok


def _sample(docs: list[np.ndarray], tokens: int | None, seed: int) -> list[np.ndarray]:
    """Whole documents in a seeded random order until ``tokens`` are reached (all when None)."""
    order = np.random.default_rng(seed).permutation(len(docs))
    out, n = [], 0
    for i in order:
        if tokens is not None and n >= tokens:
            break
        out.append(docs[i])
        n += len(docs[i])
    return out


def _layout_run(name: str, fractions: Sequence[float], policies: Sequence[str], eval_corpora: Sequence[str],
                eval_tokens: int | None, hot_tokens: int | None, tiny_vocab: int, tiny_tokenizer_bytes: int,
                cache_dir: Path, seed: int, log: TextIO) -> dict[str, Any]:
    from engram.memory.cache_sim import compulsory_ceiling, lane_stream, simulate
    from engram.memory.hotness import corpus_documents, count_row_hotness

    spec = LAYOUTS[name]
    t0 = time.perf_counter()
    hasher, tok = _hasher_and_tokenizer(name, cache_dir, tiny_vocab, tiny_tokenizer_bytes)
    layer = hasher.layers[0]
    docs = [d for c in eval_corpora for d in corpus_documents(c, tok, "val", cache_dir)]
    stream = lane_stream(hasher, _sample(docs, eval_tokens or spec.eval_tokens, seed), layer, spec.lanes, 1, seed)
    hot_docs = [d for c in spec.hot_corpora for d in corpus_documents(c, tok, "train", cache_dir)]
    hot = count_row_hotness(hasher, _sample(hot_docs, hot_tokens, seed),
                            source={"corpus": "+".join(spec.hot_corpora), "split": "train"})
    rows = hasher.total_rows(layer)
    caps = [int(round(f * rows)) for f in fractions]
    print(f"[{name}] {rows:,} rows; stream of {stream.num_steps:,} steps, {stream.num_accesses:,} row accesses "
          f"({time.perf_counter() - t0:.0f} s to build)", file=log, flush=True)
    sims = simulate(stream, caps, list(policies), hot_ids=hot.ranked(layer),
                    progress=lambda r: print(f"[{name}] {r.policy:>10} at {r.capacity:>10,} rows: hit rate "
                                             f"{r.hit_rate:.4f} ({r.seconds:.1f} s)", file=log, flush=True))
    return {
        "layout": name, "description": spec.description, "layer": layer, "rows": rows, "fractions": list(fractions),
        "capacities": caps, "lanes": spec.lanes, "tokens": int(stream.num_steps * spec.lanes),
        "steps": stream.num_steps, "accesses": stream.num_accesses, "first_touches": stream.first_touches(),
        "compulsory_ceiling": compulsory_ceiling(stream), "eval_corpora": list(eval_corpora),
        "hotness": hot.source, "accesses_per_largest_cache": stream.num_accesses / max(caps),
        "hit_rate": {f"{r.policy}@{r.capacity}": r.hit_rate for r in sims},
        "seconds": {f"{r.policy}@{r.capacity}": r.seconds for r in sims},
    }


def _tables(res: dict[str, Any], policies: Sequence[str]) -> str:
    caps, fr = res["capacities"], res["fractions"]
    head = ["policy"] + [h for f in fr for h in (f"{f:.1%} hit rate", f"{f:.1%} / Belady")]
    rows = []
    for name in [*policies, "belady", "static-oracle"]:
        row: list[object] = [name]
        for c in caps:
            h, b = res["hit_rate"][f"{name}@{c}"], res["hit_rate"][f"belady@{c}"]
            row += [f"{h:.4f}", f"{h / b:.3f}" if b else "-"]
        rows.append(row)
    rows.append(["compulsory ceiling"] + [x for _ in caps for x in (f"{res['compulsory_ceiling']:.4f}", "")])
    title = (f"{res['description']}, layer {res['layer']}: {res['rows']:,} rows; caches of "
             + ", ".join(f"{c:,}" for c in caps) + f" rows\nheld-out stream: {'+'.join(res['eval_corpora'])}, "
             f"{res['lanes']} lanes x 1 token a step, {res['steps']:,} steps, {res['accesses']:,} row accesses "
             f"({res['accesses_per_largest_cache']:.1f}x the largest cache), first touches "
             f"{res['first_touches'] / res['accesses']:.1%}; static: hotness of {res['hotness']['corpus']} train "
             f"({res['hotness']['tokens']:,} tokens)")
    speed = []
    for name in [*policies, "belady", "static-oracle"]:
        secs = sum(res["seconds"][f"{name}@{c}"] for c in caps)
        speed.append([name, len(caps) * res["accesses"], secs, len(caps) * res["accesses"] / secs / 1e6])
    return (title + "\n" + format_table(head, rows) + "\n\nsimulator speed (all cache sizes, construction included)\n"
            + format_table(["policy", "row accesses", "seconds", "M accesses/s"], speed))


def plot(results: Sequence[dict[str, Any]], policies: Sequence[str], out_png: str | Path) -> Path:
    """Hit rate against cache size (% of rows), one panel per layout; Belady and the ceiling as references."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from engram.io import atomic_write

    fig = Figure(figsize=(5.5 * len(results), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    for k, res in enumerate(results):
        ax = fig.add_subplot(1, len(results), k + 1)
        x = [100 * f for f in res["fractions"]]
        for i, name in enumerate(policies):
            ax.plot(x, [res["hit_rate"][f"{name}@{c}"] for c in res["capacities"]], marker="o", color=f"C{i}",
                    label=name)
        ax.plot(x, [res["hit_rate"][f"belady@{c}"] for c in res["capacities"]], "k--", marker="s",
                label="Belady (offline optimum)")
        ax.plot(x, [res["hit_rate"][f"static-oracle@{c}"] for c in res["capacities"]], color="grey", linestyle="--",
                marker="^", label="static, oracle counts")
        ax.axhline(res["compulsory_ceiling"], color="grey", linestyle=":", label="compulsory ceiling")
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:g}%" for v in x])
        ax.minorticks_off()
        ax.set_xlabel("cache size (% of the layer's rows)")
        ax.set_ylabel("hit rate (row accesses, once per step)")
        ax.set_title(f"{res['layout']}: {res['rows']:,} rows", fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out = Path(out_png)
    atomic_write(out, buf.getvalue())
    return out


def run(layouts: Sequence[str] = ("tiny", "paper"), fractions: Sequence[float] = FRACTIONS,
        policies: Sequence[str] = POLICY_NAMES, eval_corpora: Sequence[str] = ("brown", "sympy"),
        eval_tokens: int | None = None, hot_tokens: int | None = None, tiny_vocab: int = 8192,
        tiny_tokenizer_bytes: int = 20_000_000, png: str | None = "runs/bench/cache_hit_rates.png",
        cache_dir: str | Path | None = None, seed: int = 0, log: TextIO = sys.stderr) -> dict[str, Any]:
    from engram.data.corpora import default_cache_dir

    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        raise ValueError(f"unknown layout(s) {unknown}; valid: {', '.join(LAYOUTS)}")
    cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    results = [_layout_run(name, fractions, policies, eval_corpora, eval_tokens, hot_tokens, tiny_vocab,
                           tiny_tokenizer_bytes, cdir, seed, log) for name in layouts]
    out: dict[str, Any] = {"results": results, "table": "\n\n".join(_tables(r, policies) for r in results)}
    if png:
        out["png"] = str(plot(results, policies, png))
        out["table"] += f"\n\nplot: {out['png']}"
    out["config"] = dict(layouts=list(layouts), fractions=list(fractions), policies=list(policies), seed=seed,
                         layout_specs={k: dataclasses.asdict(LAYOUTS[k]) for k in layouts})
    return out
