"""The four experiments of the paper's section 5, at sizes from a CPU afternoon upward.

An experiment is a list of variants (a name and a model config built for a size) trained for the same
number of tokens with the same data, seeds 0..n-1 each. Every config that spends a sparse budget
comes from the allocation solver (``engram.allocation.allocate``), so variants of one experiment share
P_tot and P_act wherever the experiment says so (checked in the tests).

Sizes (the size knob, ``--size``): ``xs`` is the default, budgeted to finish every experiment, three
seeds included, in about 3 hours on a 2-core CPU; ``s`` and ``m`` are the ``tiny`` and ``small`` preset
backbones for a GPU; ``quick`` is a seconds-long smoke size on the ``mini`` corpus. ``--tokens`` (the
budget knob) overrides the tokens per run.

    iso        dense vs MoE vs Engram-MoE: equal activated parameters, MoE and Engram-MoE equal totals
    rho        fixed P_tot and P_act, share rho of the sparse budget to routed experts, the rest to Engram
    memory     fixed MoE backbone, memory over 1.5 decades: Engram vs OverEncoding at equal table parameters
    placement  Engram block index, no gate, no tokenizer compression, no conv, 4-grams, single vs
               per-branch gating under M = 4 hyper-connection streams
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from engram.allocation import allocate, count
from engram.config import EngramConfig, ModelConfig, MoEConfig, OverEncodingConfig, TrainConfig

RHO_DEFAULT = 0.75  # the Engram-MoE split used wherever an experiment does not sweep rho (paper: 0.75-0.8)


@dataclass(frozen=True)
class Size:
    """A backbone, its MoE and Engram layouts, the data and the token budget of each experiment."""

    name: str
    backbone: dict  # ModelConfig fields of the dense backbone
    moe: MoEConfig  # the MoE baseline (routed experts before any allocation)
    engram: EngramConfig  # Engram layout; table sizes come from the allocation solver
    corpus: str
    seq_len: int
    batch_size: int
    lr: float
    tokens: dict[str, int]  # tokens per run, by experiment
    eval_sets: tuple[tuple[str, int], ...]  # (corpus, batches) evaluated after training
    memory_rows: tuple[int, ...]  # Engram rows per head for the memory experiment (>= 1.5 decades)
    seeds: int = 3
    alloc_tol: float = 0.01  # P_tot / P_act tolerance of the allocation solver (see ``engram_moe``)

    def model(self, **kw) -> ModelConfig:
        return ModelConfig(**{**self.backbone, **kw})

    def moe_model(self, **kw) -> ModelConfig:
        return self.model(moe=self.moe, **kw)

    def train_config(self, experiment: str, seed: int, tokens: int | None = None, dtype: str = "bf16") -> TrainConfig:
        tokens = tokens if tokens is not None else self.tokens[experiment]
        steps = max(1, tokens // (self.batch_size * self.seq_len))
        return TrainConfig(corpus=self.corpus, seq_len=self.seq_len, batch_size=self.batch_size, steps=steps,
                           lr=self.lr, warmup_steps=min(max(steps // 20, 1), steps), schedule="cosine", dtype=dtype,
                           eval_every=max(steps // 4, 1), eval_batches=8, ckpt_every=max(steps // 8, 1),
                           keep_checkpoints=1, seed=seed,
                           # the clipping the recorded runs used: the backbone by its own norm, tables unclipped
                           # (no table gradient reaches the backbone's norm, so Engram and MoE runs compare fairly)
                           grad_clip_groups="backbone")


_HELD_OUT = (("en", 32), ("brown", 32), ("sympy", 32))

SIZES: dict[str, Size] = {
    # smoke size for tests: seconds per run on the `mini` corpus
    "quick": Size(
        "quick", dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64),
        MoEConfig(n_routed=10, n_shared=1, top_k=2, d_expert=32, first_dense=1),
        EngramConfig(layers=(1,), max_ngram=3, heads=2, table_sizes=(64, 64), d_mem=16),
        corpus="mini", seq_len=64, batch_size=8, lr=3e-3,
        tokens=dict.fromkeys(("iso", "rho", "memory", "placement"), 8 * 64 * 6),
        eval_sets=(("mini", 2),), memory_rows=(64, 256), seeds=2, alloc_tol=0.25),
    # CPU default: under 3 hours per experiment, all seeds, on 2 cores (docs/experiments.md); `en` has
    # 16.8 M training tokens with its 4k BPE, so every run stays under one epoch
    "xs": Size(
        "xs", dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=384, max_seq_len=256),
        MoEConfig(n_routed=16, n_shared=1, top_k=2, d_expert=64, first_dense=1),
        EngramConfig(layers=(1,), max_ngram=3, heads=2, table_sizes=(1000, 1000), d_mem=16),
        corpus="en", seq_len=256, batch_size=16, lr=3e-3,
        # measured here (fp32, tokens/s, quiet machine): dense 11,013, MoE 9,800, Engram-MoE 9,159, OverEncoding
        # 9,044, 4-gram 7,590, M = 4 3,556 (per-branch) / 3,265 (single); ~45 s per run for start-up and
        # evaluation (90 s at M = 4): each experiment is estimated at 2.3 h (docs/experiments.md)
        tokens={"iso": 8_500_000, "rho": 3_700_000, "memory": 2_300_000, "placement": 1_500_000},
        eval_sets=_HELD_OUT, memory_rows=(10_000, 32_000, 100_000, 320_000)),
    # GPU sizes: the `tiny` and `small` preset backbones, under one epoch of `en` (15.0 M / 13.8 M tokens
    # with their 8k / 16k BPEs)
    "s": Size(
        "s", dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=768, max_seq_len=256),
        MoEConfig(n_routed=16, n_shared=1, top_k=2, d_expert=128, first_dense=1),
        EngramConfig(layers=(1,), max_ngram=3, heads=2, table_sizes=(1000, 1000), d_mem=32),
        corpus="en", seq_len=256, batch_size=32, lr=3e-3,
        tokens=dict.fromkeys(("iso", "rho", "memory", "placement"), 12_000_000),
        eval_sets=_HELD_OUT, memory_rows=(10_000, 32_000, 100_000, 320_000, 1_000_000)),
    "m": Size(
        "m", dict(vocab_size=16384, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1536, max_seq_len=512),
        MoEConfig(n_routed=32, n_shared=1, top_k=4, d_expert=256, first_dense=1),
        EngramConfig(layers=(1,), max_ngram=3, heads=4, table_sizes=(1000, 1000), d_mem=64),
        corpus="en", seq_len=512, batch_size=32, lr=1.5e-3,
        tokens=dict.fromkeys(("iso", "rho", "memory", "placement"), 12_000_000),
        eval_sets=_HELD_OUT, memory_rows=(32_000, 100_000, 320_000, 1_000_000, 3_200_000)),
}


# ------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One model of an experiment. ``x`` is its position on the experiment's plot axis (rho, memory)."""

    name: str
    build: Callable[[Size], ModelConfig]
    x: float | None = None
    family: str | None = None  # curve it belongs to on a plot (e.g. "Engram", "OverEncoding")
    needs: tuple[str, ...] = ()  # EngramConfig fields this variant needs (absent fields: not runnable yet)


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    variants: tuple[Variant, ...]
    comparisons: tuple[tuple[str, str], ...]  # (variant, baseline): report variant - baseline, paired by seed
    paper: str  # what the paper found, for the report
    plot: str | None = None  # "rho" or "memory"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ValueError(f"experiment {self.name!r} has no variant {name!r}; variants: {[v.name for v in self.variants]}")


def engram_moe(size: Size, rho: float = RHO_DEFAULT, hc_mult: int = 1, tol: float = 0.01, **engram_changes) -> ModelConfig:
    """Engram-MoE with the MoE baseline's P_tot and P_act (of the same hc_mult): allocation at ``rho``.
    Engram's dense projections are activated parameters the solver cannot trade: ``tol`` bounds them."""
    e = dataclasses.replace(size.engram, **engram_changes)
    base = size.moe_model(engram=e, hc_mult=hc_mult)
    return allocate(base, rho, tol=max(tol, size.alloc_tol)).config


def dense_iso(size: Size) -> ModelConfig:
    """The dense model whose P_act matches the MoE baseline's: the FFN width solved for (every block dense)."""
    want = count(size.moe_model())["P_act"]
    per_unit = count(size.model(d_ff=2))["P_act"] - count(size.model(d_ff=1))["P_act"]
    fixed = count(size.model(d_ff=1))["P_act"] - per_unit
    return size.model(d_ff=max(1, round((want - fixed) / per_unit)))


def _memory_engram(rows: int) -> Callable[[Size], ModelConfig]:
    def build(size: Size) -> ModelConfig:
        e = dataclasses.replace(size.engram, table_sizes=(rows,) * (size.engram.max_ngram - 1))
        return size.moe_model(engram=e)

    return build


def _memory_overencoding(rows: int) -> Callable[[Size], ModelConfig]:
    """OverEncoding holding the same table parameters as Engram with ``rows`` rows per head: its rows are
    d_model wide (they are averaged into the embedding), so it gets d_head / d_model as many rows."""

    def build(size: Size) -> ModelConfig:
        e = size.engram
        n_orders = e.max_ngram - 1
        oe_rows = max(2, round(rows * e.total_heads * e.d_head / (n_orders * size.backbone["d_model"])))
        return size.moe_model(overencoding=OverEncodingConfig(max_ngram=e.max_ngram, heads=1, table_sizes=(oe_rows,) * n_orders))

    return build


def memory_params(size: Size, rows: int) -> int:
    """Table parameters of the memory experiment's point with ``rows`` Engram rows per head (nominal)."""
    return rows * size.engram.total_heads * len(size.engram.layers) * size.engram.d_head


RHOS = (1.0, 0.9, 0.75, 0.6, 0.4, 0.2)


def experiments(size: Size) -> dict[str, Experiment]:
    iso = Experiment(
        "iso", "Iso-parameter, iso-FLOP: dense vs MoE vs Engram-MoE",
        (Variant("dense", dense_iso), Variant("moe", lambda s: s.moe_model()), Variant("engram-moe", engram_moe)),
        (("engram-moe", "moe"), ("moe", "dense"), ("engram-moe", "dense")),
        paper="Engram-27B vs MoE-27B (iso-parameter, iso-FLOP): validation loss 1.634 -> 1.622 (-0.012); "
              "both far ahead of the dense model at equal activated parameters.")
    rho = Experiment(
        "rho", "Sparsity allocation: fixed P_tot and P_act, rho = share of P_sparse in routed experts",
        tuple(Variant(f"rho{r:.2f}", lambda s, r=r: engram_moe(s, rho=r), x=r) for r in RHOS),
        tuple((f"rho{r:.2f}", "rho1.00") for r in RHOS if r < 1.0),
        paper="U-shaped validation loss over rho, optimum near rho = 0.75-0.80; at 10B total parameters "
              "1.7248 (rho = 1, pure MoE) -> 1.7109 at the optimum (-0.014).", plot="rho")
    memory = Experiment(
        "memory", "Memory scaling: fixed MoE backbone, table size over 1.5 decades, Engram vs OverEncoding",
        (Variant("backbone", lambda s: s.moe_model()),
         *(Variant(f"engram-{r}", _memory_engram(r), x=float(r), family="Engram") for r in size.memory_rows),
         *(Variant(f"overencoding-{r}", _memory_overencoding(r), x=float(r), family="OverEncoding") for r in size.memory_rows)),
        tuple((f"engram-{r}", f"overencoding-{r}") for r in size.memory_rows)
        + tuple((f"engram-{r}", "backbone") for r in size.memory_rows),
        paper="Loss falls log-linearly as memory slots grow (2.6e5 -> 1e7 slots) with no sign of saturation, "
              "and Engram beats OverEncoding at equal memory.", plot="memory",
        notes=("Slots beyond the number of distinct n-grams in the training data can only plateau; the "
               "report counts them.",))
    layers = [i for i in range(size.backbone["n_layers"]) if i != size.engram.layers[0]]
    placement = Experiment(
        "placement", "Placement and components of Engram",
        (Variant(f"layer{size.engram.layers[0]}", engram_moe),
         *(Variant(f"layer{i}", lambda s, i=i: engram_moe(s, layers=(i,))) for i in layers),
         Variant("no-gate", lambda s: engram_moe(s, use_gate=False), needs=("use_gate",)),
         Variant("no-compress", lambda s: engram_moe(s, compress=False)),
         Variant("no-conv", lambda s: engram_moe(s, use_conv=False)),
         Variant("4-gram", lambda s: engram_moe(s, max_ngram=4, table_sizes=(1000,) * 3, tol=0.015,
                                                d_mem=s.engram.d_head * 3 * s.engram.heads)),
         Variant("m4-per-branch", lambda s: engram_moe(s, hc_mult=4, tol=0.03)),
         Variant("m4-single", lambda s: engram_moe(s, hc_mult=4, gate="single", tol=0.03))),
        tuple((v, f"layer{size.engram.layers[0]}") for v in
              [f"layer{i}" for i in layers] + ["no-gate", "no-compress", "no-conv", "4-gram"])
        + (("m4-single", "m4-per-branch"),),
        paper="3B MoE, 100B tokens: a single Engram at layer 2 is best; removing branch-specific gating, the "
              "gate itself or tokenizer compression hurts most; removing the short conv hurts little; "
              "4-grams do not help at this memory budget.",
        notes=("The 4-gram variant keeps the row width and the table parameters; d_mem grows by half, so its "
               "dense projections make P_act up to 1.5% larger than the MoE's (1% for the others).",
               "Under M = 4, per-branch gating has M key projections and single gating its own mHC mapping: "
               "both add activated parameters (up to 3% of the M = 4 MoE's P_act).",
               "m4-* run with M = 4 hyper-connection streams; each is allocated against the M = 4 MoE."))
    return {e.name: e for e in (iso, rho, memory, placement)}


EXPERIMENT_NAMES = ("iso", "rho", "memory", "placement")


def missing_fields(variant: Variant) -> list[str]:
    """EngramConfig fields the variant needs that this version of engram does not have yet."""
    have = {f.name for f in dataclasses.fields(EngramConfig)}
    return [f for f in variant.needs if f not in have]


__all__ = ["EXPERIMENT_NAMES", "Experiment", "RHOS", "SIZES", "Size", "Variant", "dense_iso", "engram_moe",
           "experiments", "memory_params", "missing_fields"]
