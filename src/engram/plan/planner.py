"""Placement planner: per-rank memory and per-step traffic of a preset trained on ``world_size`` ranks.

The layout the planner assumes (the sharded trainer's design):

* **backbone** (every parameter except the Engram tables): ``replicated`` (DDP: every rank holds all of it,
  gradients all-reduced) or ``sharded`` (ZeRO-3 / FSDP style: parameters, gradients and optimizer state
  split evenly, parameters all-gathered per layer; the memory a sharded backbone would take);
* **tables**: each Engram layer's rows split across ranks (ceil(rows / world) per rank); a rank keeps
  sparse-Adam moments only for the rows it owns; a step's row ids are deduplicated per rank, exchanged by
  all-to-all with their owners, rows come back, gradients go to the owners;
* **optimizer**: AdamW (two moments) for the backbone, or Muon (one momentum buffer) for its 2-D hidden
  matrices with AdamW for the rest, exactly as ``engram.train.optim.build_optimizers`` groups them.

Parameter counts come from the model itself, built on the meta device (no memory). Activations are an
estimate (``activation_bytes_per_token``): bytes saved for backward under bf16 autocast without activation
checkpointing, per block type, fitted to saved-tensor measurements of the small presets (tests hold it
within 25%). All-to-all volume needs one measured figure: unique rows per token per Engram layer after
the per-rank deduplication of a step (``engram.plan.traffic.measure_rows_per_token``, on real text).

Bytes are per rank; traffic is what one rank sends per step (it receives as much, by symmetry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from engram.config import ModelConfig

GiB = 1 << 30
_BYTES = {"fp32": 4, "bf16": 2}
Dtype = Literal["fp32", "bf16"]


class PlacementError(ValueError):
    """The placement does not fit the per-rank memory; the message names what dominates and what to try."""


@dataclass(frozen=True, slots=True)
class PlanConfig:
    """How a preset is placed and trained. ``rows_per_token``: unique Engram rows per token per layer after
    per-rank deduplication at this batch x seq (measured); ``None`` plans without the all-to-all figures."""

    world_size: int
    batch_size: int  # sequences per rank per step
    seq_len: int
    backbone: Literal["replicated", "sharded"] = "replicated"
    optimizer: Literal["adamw", "muon"] = "adamw"
    param_dtype: Dtype = "fp32"  # master weights (and their gradients)
    optim_dtype: Dtype = "fp32"  # backbone optimizer state
    table_dtype: Dtype | None = None  # None: the model config's
    table_optim_dtype: Dtype = "fp32"  # sparse Adam moments of owned rows
    wire_dtype: Dtype = "fp32"  # rows and row gradients on the wire
    rows_per_token: float | None = None
    packed: bool = True  # documents packed with a document mask (one T x T bool mask per block)
    checkpointing: bool = False  # activation checkpointing per block (recompute in backward)
    memory_gib: float | None = None  # per-rank memory to fit in

    def __post_init__(self) -> None:
        for name in ("world_size", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"PlanConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.backbone not in ("replicated", "sharded"):
            raise ValueError(f"PlanConfig.backbone must be 'replicated' or 'sharded', got {self.backbone!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"PlanConfig.optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        for name in ("param_dtype", "optim_dtype", "table_optim_dtype", "wire_dtype"):
            if getattr(self, name) not in _BYTES:
                raise ValueError(f"PlanConfig.{name} must be fp32 or bf16, got {getattr(self, name)!r}")
        if self.table_dtype is not None and self.table_dtype not in _BYTES:
            raise ValueError(f"PlanConfig.table_dtype must be fp32 or bf16, got {self.table_dtype!r}")
        if self.rows_per_token is not None and self.rows_per_token <= 0:
            raise ValueError(f"PlanConfig.rows_per_token must be positive, got {self.rows_per_token}")
        if self.memory_gib is not None and self.memory_gib <= 0:
            raise ValueError(f"PlanConfig.memory_gib must be positive, got {self.memory_gib}")


@dataclass
class Plan:
    """Per-rank memory (bytes) by item, per-step traffic (bytes sent per rank) by item, and the inputs."""

    preset: str
    config: PlanConfig
    params: ParamCounts
    memory: dict[str, float] = field(default_factory=dict)
    traffic: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.memory.values())

    def fits(self, memory_gib: float) -> bool:
        return self.total <= memory_gib * GiB

    def check_fits(self, memory_gib: float | None = None) -> None:
        """Raise ``PlacementError`` naming the largest items when the per-rank total exceeds the memory."""
        gib = memory_gib if memory_gib is not None else self.config.memory_gib
        if gib is None or self.fits(gib):
            return
        top = sorted(self.memory.items(), key=lambda kv: -kv[1])[:3]
        worst = ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in top)
        hints = []
        if self.config.backbone == "replicated":
            hints.append("--backbone sharded")
        hints += ["more ranks", "a smaller --batch-size"]
        if self.config.optim_dtype == "fp32":
            hints.append("--optim-dtype bf16")
        raise PlacementError(
            f"{self.preset} on {self.config.world_size} ranks needs {self.total / GiB:.1f} GiB per rank, more than "
            f"{gib:g} GiB (largest: {worst}); try {', '.join(hints)}")


# --------------------------------------------------------------------------------------- accounting


@dataclass(frozen=True, slots=True)
class ParamCounts:
    """Parameters as the trainer's optimizers group them (``backbone`` = everything but the tables)."""

    total: int
    backbone: int
    tables: int
    muon: int  # backbone matrices Muon would take (the rest of the backbone stays on AdamW)
    layer_rows: tuple[int, ...]  # rows of each Engram layer's table

    @classmethod
    def of(cls, cfg: ModelConfig) -> ParamCounts:
        """Counted on the meta-device model (no memory), grouped by ``build_optimizers``."""
        from engram.model import build_model
        from engram.train.optim import TABLE_GROUP, build_optimizers

        model = build_model(cfg, device="meta")
        groups = {g["name"]: sum(p.numel() for p in g["params"])
                  for g in build_optimizers(model, lr=1e-3, backbone="muon").param_groups}
        total = model.param_counts()["total"]
        tables = groups.get(TABLE_GROUP, 0)
        rows = tuple(layer.table.num_rows for layer in model.engram_layers().values())
        return cls(total, total - tables, tables, groups.get("backbone_muon", 0), rows)


def activation_bytes_per_token(cfg: ModelConfig, seq_len: int, packed: bool = True, checkpointing: bool = False) -> float:
    """Bytes saved for backward per token (bf16 autocast, fp32 residual streams).

    Per block: two RMSNorms (8 D each: fp32 input and output); attention 6 D + 12 (Q + KV) (input casts,
    q/k/v before and after RoPE, attention output; no T x T term: memory-efficient attention saves none);
    dense SwiGLU 4 D + 8 F; MoE 8 D + 8 E + 6 k D + 8 k F_e + 8 S F_e (fp32 router input and scores, routed
    copies, expert hiddens, fp32 combine, shared experts); with M > 1 streams, 9 M D per hyper-connection
    (two per block). Per Engram layer 46 M D + 20 d_mem. LM head 4 V + 8 D. With packed documents, one
    T x T bool mask per block: T bytes per token. Fitted to saved-tensor measurements of ``tiny``,
    ``small`` and ``tiny`` with M = 4 (within 15%).

    With ``checkpointing`` every block keeps only its input streams (4 M D) and one block at a time is
    recomputed in full during backward (the largest block counts once).
    """
    D, M = cfg.d_model, cfg.hc_mult
    Q, KV = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    attn = 6 * D + 12 * (Q + KV)
    hc = 2 * 9 * M * D if M > 1 else 0
    blocks = []
    for i in range(cfg.n_layers):
        moe = cfg.moe
        if moe is not None and i >= moe.first_dense:
            ffn = 8 * D + 8 * moe.n_routed + 6 * moe.top_k * D + 8 * moe.top_k * moe.d_expert + 8 * moe.n_shared * moe.d_expert
        else:
            ffn = 4 * D + 8 * cfg.d_ff
        engram = 46 * M * D + 20 * cfg.engram.d_mem if cfg.engram is not None and i in cfg.engram.layers else 0
        blocks.append(16 * D + attn + ffn + hc + engram + (seq_len if packed else 0))
    body = cfg.n_layers * 4 * M * D + max(blocks) if checkpointing else sum(blocks)
    return body + 4 * cfg.vocab_size + 8 * D


def plan(cfg: ModelConfig, pc: PlanConfig, preset_name: str = "custom", params: ParamCounts | None = None) -> Plan:
    """Per-rank memory and per-step traffic of ``cfg`` under placement ``pc`` (see the module docstring)."""
    p = params if params is not None else ParamCounts.of(cfg)
    W, B, T = pc.world_size, pc.batch_size, pc.seq_len
    pb, ob = _BYTES[pc.param_dtype], _BYTES[pc.optim_dtype]
    share = 1.0 / W if pc.backbone == "sharded" else 1.0
    backbone = p.backbone * share
    moments = 2 * (p.backbone - p.muon) + (p.muon if pc.optimizer == "muon" else 2 * p.muon)
    out = Plan(preset_name, pc, p)
    out.memory["backbone weights"] = backbone * pb
    out.memory["backbone gradients"] = backbone * pb
    out.memory[f"backbone optimizer ({pc.optimizer})"] = moments * share * ob
    e = cfg.engram
    if e is not None:
        tb = _BYTES[pc.table_dtype or ("bf16" if e.table_dtype == "bfloat16" else "fp32")]
        owned_rows = sum(math.ceil(r / W) for r in p.layer_rows)
        out.memory["table shard (owned rows)"] = owned_rows * e.d_head * tb
        out.memory["table optimizer (owned rows)"] = 2 * owned_rows * e.d_head * _BYTES[pc.table_optim_dtype]
    out.memory["activations"] = B * T * activation_bytes_per_token(cfg, T, pc.packed, pc.checkpointing)
    if e is not None and pc.rows_per_token is not None:
        _add_traffic(out, cfg, pc)
    if pc.backbone == "replicated":
        out.traffic["backbone all-reduce (ring)"] = 2 * (W - 1) / W * p.backbone * pb
    else:
        out.traffic["backbone reduce-scatter + 2 all-gathers"] = 3 * (W - 1) / W * p.backbone * pb
    return out


def _add_traffic(out: Plan, cfg: ModelConfig, pc: PlanConfig) -> None:
    """All-to-all bytes one rank sends per step (ids out, rows served, gradients back), with and without
    deduplication, plus the receive-side buffers they need."""
    e = cfg.engram
    W, tokens = pc.world_size, pc.batch_size * pc.seq_len
    remote = (W - 1) / W  # uniform hashing: 1/W of a rank's rows are its own
    wb = _BYTES[pc.wire_dtype]
    per_row = 8 + e.d_head * wb + e.d_head * wb  # id, row, gradient
    L = len(e.layers)
    unique = pc.rows_per_token * tokens
    out.traffic["all-to-all, deduplicated"] = L * unique * remote * per_row
    out.traffic["all-to-all, without dedup"] = L * tokens * e.total_heads * remote * per_row
    # rows a rank gathers for its batch and serves to others, and their gradients (fp32 on the owner)
    out.memory["lookup buffers"] = L * unique * e.d_head * (2 * wb + 4)


def format_plan(p: Plan) -> str:
    """Plain-text tables: the placement, memory per rank, traffic per step."""
    from engram.report import format_table

    c = p.config
    head = (f"{p.preset} on {c.world_size} ranks, {c.batch_size} x {c.seq_len} tokens per rank per step; backbone "
            f"{c.backbone}, {c.optimizer}, weights {c.param_dtype}, optimizer state {c.optim_dtype}, table moments "
            f"{c.table_optim_dtype}, wire {c.wire_dtype}{', activation checkpointing' if c.checkpointing else ''}\nparameters: backbone {p.params.backbone / 1e9:.2f} B, "
            f"tables {p.params.tables / 1e9:.2f} B in {len(p.params.layer_rows)} layers of "
            + ", ".join(f"{r:,}" for r in p.params.layer_rows) + " rows")
    mem = [[k, v / GiB] for k, v in p.memory.items()] + [["total", p.total / GiB]]
    out = head + "\n" + format_table(["per rank", "GiB"], mem)
    if p.traffic:
        tokens = c.batch_size * c.seq_len
        rows = [[k, v / 2**20, v / tokens] for k, v in p.traffic.items()]
        out += "\n" + format_table(["sent per rank per step", "MiB", "bytes / token"], rows)
    if c.memory_gib is not None:
        verdict = "fits" if p.fits(c.memory_gib) else "does NOT fit"
        out += f"\n{verdict} in {c.memory_gib:g} GiB per rank"
    return out


def smallest_world_size(cfg: ModelConfig, pc: PlanConfig, memory_gib: float, params: ParamCounts | None = None,
                        limit: int = 1 << 16) -> int | None:
    """The smallest power-of-two world size at which ``pc`` (otherwise unchanged) fits, or None."""
    import dataclasses

    p = params if params is not None else ParamCounts.of(cfg)
    w = 1
    while w <= limit:
        if plan(cfg, dataclasses.replace(pc, world_size=w), params=p).fits(memory_gib):
            return w
        w *= 2
    return None


__all__ = ["GiB", "ParamCounts", "format_plan", "Plan", "PlanConfig", "PlacementError", "activation_bytes_per_token", "plan", "smallest_world_size"]
