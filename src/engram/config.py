"""Typed, validated configuration for engram.

One dataclass per concern, validated in ``__post_init__`` so a bad config fails at construction, never
mid-training. Every config round-trips through JSON (``to_dict`` / ``from_dict``) and is saved with each
checkpoint; ``diff_configs`` names the fields that differ when a checkpoint is refused.

Only the top model reads a ``ModelConfig``; leaf modules take explicit arguments.

Dtype policy (stated once for the whole library): bf16 compute where it helps (matmuls under autocast),
fp32 for norms, router, softmax and loss, fp32 master weights, and int64 for all hash arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

TABLE_DTYPES = ("float32", "bfloat16")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class EngramConfig:
    """The conditional-memory module: hash layout (SPEC section 2) and fusion (section 3).

    ``table_sizes`` gives, per order n = 2..max_ngram, the size every head's prime search starts from
    (the reference's ``engram_vocab_size``); each head of each layer gets its own distinct prime at or
    above it. ``d_mem`` is the width of the concatenated retrieval e_t, split evenly over
    (max_ngram - 1) * heads heads. ``layers`` are block indices of the backbone.

    Fusion options that express DeepSeek's reference settings (docs/interop.md; defaults are ours):
    ``proj_bias`` adds biases to W_V and W_K (the public demo has them); ``gate_norm_eps`` is the RMSNorm
    epsilon of the gate's query and key norms (demo: fp32 machine epsilon, V4.1: 1e-20); ``conv_norm_eps``
    that of the short conv's norm (demo: 1e-5); ``use_gate=False`` is the paper's no-gate ablation: alpha
    is fixed at 1, so the key projection and the gate norms are not built.
    """

    layers: tuple[int, ...] = (1,)
    max_ngram: int = 3
    heads: int = 8
    table_sizes: tuple[int, ...] = (1000, 1000)
    d_mem: int = 256
    seed: int = 0
    pad_id: int = 2  # raw tokenizer id; mapped through the compression map like the reference
    use_conv: bool = True
    kernel_size: int = 4
    signed_sqrt: bool = True
    gate: Literal["per_branch", "single"] = "per_branch"  # "single": one fusion after the pre-mapping
    table_dtype: str = "float32"
    table_init_std: float = 1.0
    compress: bool = True  # apply tokenizer compression before hashing (ablation: False)
    proj_bias: bool = False  # biases on the value and key projections
    gate_norm_eps: float = 1e-6  # RMSNorm epsilon of the gate's query/key norms
    conv_norm_eps: float = 1e-6  # RMSNorm epsilon of the short conv's norm
    use_gate: bool = True  # False: alpha = 1 (ablation)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "table_sizes", tuple(int(x) for x in self.table_sizes))
        _check(len(self.layers) >= 1, "EngramConfig.layers must name at least one block")
        _check(len(set(self.layers)) == len(self.layers), f"EngramConfig.layers has duplicates: {self.layers}")
        _check(all(x >= 0 for x in self.layers), f"EngramConfig.layers must be >= 0, got {self.layers}")
        _check(self.max_ngram >= 2, f"EngramConfig.max_ngram must be >= 2 (no unigram), got {self.max_ngram}")
        _check(self.heads >= 1, f"EngramConfig.heads must be >= 1, got {self.heads}")
        _check(
            len(self.table_sizes) == self.max_ngram - 1,
            f"EngramConfig.table_sizes needs one size per order 2..{self.max_ngram} "
            f"({self.max_ngram - 1}), got {len(self.table_sizes)}",
        )
        _check(all(s > 0 for s in self.table_sizes), f"EngramConfig.table_sizes must be positive, got {self.table_sizes}")
        n_heads_total = (self.max_ngram - 1) * self.heads
        _check(
            self.d_mem > 0 and self.d_mem % n_heads_total == 0,
            f"EngramConfig.d_mem={self.d_mem} must be a positive multiple of (max_ngram-1)*heads={n_heads_total}",
        )
        _check(self.seed >= 0, f"EngramConfig.seed must be >= 0, got {self.seed}")
        _check(self.pad_id >= 0, f"EngramConfig.pad_id must be >= 0, got {self.pad_id}")
        _check(self.kernel_size >= 1, f"EngramConfig.kernel_size must be >= 1, got {self.kernel_size}")
        _check(self.gate in ("per_branch", "single"), f"EngramConfig.gate must be 'per_branch' or 'single', got {self.gate!r}")
        _check(self.table_dtype in TABLE_DTYPES, f"EngramConfig.table_dtype must be one of {TABLE_DTYPES}, got {self.table_dtype!r}")
        _check(self.table_init_std > 0, "EngramConfig.table_init_std must be positive")
        for name in ("gate_norm_eps", "conv_norm_eps"):
            eps = getattr(self, name)
            _check(isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0,
                   f"EngramConfig.{name} must be a positive finite number, got {eps!r}")

    @property
    def total_heads(self) -> int:
        return (self.max_ngram - 1) * self.heads

    @property
    def d_head(self) -> int:
        return self.d_mem // self.total_heads

    @property
    def dilation(self) -> int:
        return self.max_ngram


@dataclass(frozen=True, slots=True)
class MoEConfig:
    """DeepSeekMoE: shared experts plus fine-grained routed experts with top-k routing."""

    n_routed: int = 8
    n_shared: int = 1
    top_k: int = 2
    d_expert: int = 128  # hidden width of one (routed or shared) expert
    first_dense: int = 1  # the first blocks stay dense
    bias_update_rate: float = 1e-3  # loss-free balancing: per-expert bias step
    aux_loss_coef: float = 0.0
    score_func: Literal["softmax", "sigmoid"] = "sigmoid"
    route_scale: float = 1.0

    def __post_init__(self) -> None:
        _check(self.n_routed >= 1, f"MoEConfig.n_routed must be >= 1, got {self.n_routed}")
        _check(self.n_shared >= 0, f"MoEConfig.n_shared must be >= 0, got {self.n_shared}")
        _check(1 <= self.top_k <= self.n_routed, f"MoEConfig.top_k={self.top_k} must be in [1, n_routed={self.n_routed}]")
        _check(self.d_expert >= 1, f"MoEConfig.d_expert must be >= 1, got {self.d_expert}")
        _check(self.first_dense >= 0, f"MoEConfig.first_dense must be >= 0, got {self.first_dense}")
        _check(self.bias_update_rate >= 0, "MoEConfig.bias_update_rate must be >= 0")
        _check(self.aux_loss_coef >= 0, "MoEConfig.aux_loss_coef must be >= 0")
        _check(self.score_func in ("softmax", "sigmoid"), f"MoEConfig.score_func must be softmax|sigmoid, got {self.score_func!r}")


@dataclass(frozen=True, slots=True)
class OverEncodingConfig:
    """Baseline: hashed n-gram embeddings (same hasher) averaged into the input embedding."""

    max_ngram: int = 3
    heads: int = 1
    table_sizes: tuple[int, ...] = (1000, 1000)
    seed: int = 0
    pad_id: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "table_sizes", tuple(int(x) for x in self.table_sizes))
        _check(self.max_ngram >= 2, f"OverEncodingConfig.max_ngram must be >= 2, got {self.max_ngram}")
        _check(self.heads >= 1, f"OverEncodingConfig.heads must be >= 1, got {self.heads}")
        _check(len(self.table_sizes) == self.max_ngram - 1, "OverEncodingConfig.table_sizes needs one size per order")
        _check(all(s > 0 for s in self.table_sizes), "OverEncodingConfig.table_sizes must be positive")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The decoder LM: RoPE GQA attention, dense SwiGLU or DeepSeekMoE blocks, M residual streams."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int | None = None  # default d_model // n_heads
    d_ff: int = 683  # dense SwiGLU hidden width
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    hc_mult: int = 1  # M residual streams (hyper-connections); 1 = plain residual
    sinkhorn_iters: int = 20
    moe: MoEConfig | None = None
    engram: EngramConfig | None = None
    overencoding: OverEncodingConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", from_dict(MoEConfig, self.moe))
        if isinstance(self.engram, dict):
            object.__setattr__(self, "engram", from_dict(EngramConfig, self.engram))
        if isinstance(self.overencoding, dict):
            object.__setattr__(self, "overencoding", from_dict(OverEncodingConfig, self.overencoding))
        _check(self.vocab_size >= 2, f"ModelConfig.vocab_size must be >= 2, got {self.vocab_size}")
        _check(self.d_model >= 1 and self.n_layers >= 1, "ModelConfig.d_model and n_layers must be >= 1")
        _check(self.n_heads >= 1 and self.n_kv_heads >= 1, "ModelConfig.n_heads and n_kv_heads must be >= 1")
        _check(self.n_heads % self.n_kv_heads == 0, f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim is None:
            _check(self.d_model % self.n_heads == 0, f"ModelConfig.n_heads={self.n_heads} must divide d_model={self.d_model}")
        _check(self.d_ff >= 1, "ModelConfig.d_ff must be >= 1")
        _check(self.max_seq_len >= 1, "ModelConfig.max_seq_len must be >= 1")
        _check(self.hc_mult >= 1, f"ModelConfig.hc_mult must be >= 1, got {self.hc_mult}")
        _check(self.sinkhorn_iters >= 1, "ModelConfig.sinkhorn_iters must be >= 1")
        if self.moe is not None:
            _check(self.moe.first_dense <= self.n_layers, "MoEConfig.first_dense exceeds n_layers")
        if self.engram is not None:
            bad = [i for i in self.engram.layers if i >= self.n_layers]
            _check(not bad, f"Engram layer index {bad} out of range for n_layers={self.n_layers}")
        if self.engram is not None and self.overencoding is not None:
            raise ValueError("ModelConfig: engram and overencoding are alternatives; set at most one")

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """One training run: data, optimisation (the paper's split), precision, cadence."""

    corpus: str = "mini"
    tokenizer: str | None = None  # a tokenizer.json; None: a byte-level BPE trained on the corpus (cached)
    tokenizer_max_bytes: int | None = 20_000_000  # BPE training sample (deterministic)
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    table_lr_mult: float = 5.0  # Engram tables: Adam at lr x5, weight decay 0 (SPEC section 4)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    backbone_optimizer: Literal["adamw", "muon"] = "adamw"
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = 20
    grad_clip: float = 1.0  # max norm of each clipped gradient group (see grad_clip_groups); 0 disables
    # "per_group": the backbone and the tables each clipped by their own norm (a global norm including the
    # sparse table rows would shrink backbone steps, and differently with than without tables);
    # "global": one norm over both; "backbone": tables unclipped (runs saved before this field existed)
    grad_clip_groups: Literal["per_group", "global", "backbone"] = "per_group"
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # "auto": bf16 where the hardware makes it fast
    compile: bool = False  # torch.compile each decoder block (engram.runtime.compile_blocks)
    eval_every: int = 100
    eval_batches: int = 16
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    loader_timeout: float = 600.0  # seconds to wait for one batch from the loader thread before failing

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "steps", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints"):
            _check(getattr(self, name) >= 1, f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float):
                _check(math.isfinite(v), f"TrainConfig.{f.name} must be a finite number, got {v}")
        _check(self.seed >= 0, f"TrainConfig.seed must be >= 0, got {self.seed}")
        _check(self.loader_timeout > 0, f"TrainConfig.loader_timeout must be positive, got {self.loader_timeout}")
        _check(self.lr > 0 and self.table_lr_mult > 0, "TrainConfig.lr and table_lr_mult must be positive")
        _check(self.weight_decay >= 0 and self.grad_clip >= 0 and self.warmup_steps >= 0,
               "TrainConfig.weight_decay, grad_clip and warmup_steps must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "TrainConfig betas must lie in [0, 1)")
        _check(self.warmup_steps <= self.steps,
               f"TrainConfig.warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})")
        _check(self.dtype in ("auto", "bf16", "fp32"), f"TrainConfig.dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        _check(self.schedule in ("cosine", "step", "constant"), f"TrainConfig.schedule: unknown {self.schedule!r}")
        _check(self.backbone_optimizer in ("adamw", "muon"), f"TrainConfig.backbone_optimizer: unknown {self.backbone_optimizer!r}")
        _check(self.grad_clip_groups in ("per_group", "global", "backbone"),
               f"TrainConfig.grad_clip_groups must be per_group, global or backbone, got {self.grad_clip_groups!r}")


# ---------------------------------------------------------------------------------------------- JSON


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from ``to_dict`` output; unknown keys raise (no silent drift).

    Missing keys take their defaults, so a config saved before a field existed still loads (every new
    field's default keeps the earlier behaviour)."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
    return cls(**data)


def with_defaults(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """A saved ``to_dict`` output with every field added since it was saved set to its default, so a
    config written before a field existed compares equal to today's config of the same run."""
    return to_dict(from_dict(cls, data))


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def diff_configs(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of fields whose values differ between two ``to_dict`` outputs."""
    diffs: list[str] = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += diff_configs(va, vb, prefix + k + ".")
        elif va != vb:
            diffs.append(f"{prefix}{k}: {va!r} != {vb!r}")
    return diffs


__all__ = [
    "EngramConfig",
    "MoEConfig",
    "OverEncodingConfig",
    "ModelConfig",
    "TrainConfig",
    "PRESET_NAMES",
    "preset",
    "to_dict",
    "from_dict",
    "with_defaults",
    "to_json",
    "diff_configs",
]


# --------------------------------------------------------------------------------------------- presets
#
# Paper-shaped presets follow the paper's backbone (30 blocks, width 2560, mHC with M = 4, DeepSeek-V3
# tokenizer of 129,280 ids, Engram at blocks 1 and 15, N = 3, 8 heads per order). What the paper does not
# pin down here is assumed and documented in docs/model.md: GQA attention with 20 heads of 128 in place
# of MLA, routed/shared expert width 1536, 1 shared + top-6 routed experts, first block dense (SwiGLU
# 11,520), d_mem 1280. The expert counts (72 -> 55) and table sizes come from the allocation solver.

_V3_VOCAB = 129_280


def _paper_backbone(**kw: Any) -> ModelConfig:
    base = dict(vocab_size=_V3_VOCAB, d_model=2560, n_layers=30, n_heads=20, n_kv_heads=20, head_dim=128,
                d_ff=11_520, max_seq_len=4096, hc_mult=4)
    base.update(kw)
    return ModelConfig(**base)


def _paper_moe(n_routed: int) -> MoEConfig:
    return MoEConfig(n_routed=n_routed, n_shared=1, top_k=6, d_expert=1536, first_dense=1)


def _paper_engram(rows_per_head: int) -> EngramConfig:
    return EngramConfig(layers=(1, 15), max_ngram=3, heads=8, table_sizes=(rows_per_head, rows_per_head), d_mem=1280)


def _tiny_backbone(**kw: Any) -> ModelConfig:
    base = dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=768, max_seq_len=256)
    base.update(kw)
    return ModelConfig(**base)


def _small_backbone(**kw: Any) -> ModelConfig:
    base = dict(vocab_size=16384, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1536, max_seq_len=512)
    base.update(kw)
    return ModelConfig(**base)


# tiny / small: the Engram variants are allocate(<name>-moe + Engram layout, rho=0.75) (tests check it);
# one Engram layer at block 1 (the paper's best single placement) with a narrow d_mem, so its dense
# projections stay within 1% of P_act at this width.
_TINY_MOE = dict(n_shared=1, top_k=2, d_expert=128, first_dense=1)
_SMALL_MOE = dict(n_shared=1, top_k=4, d_expert=256, first_dense=1)


def _presets() -> dict[str, Any]:
    return {
        "debug": lambda: ModelConfig(
            vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64,
            moe=MoEConfig(n_routed=4, n_shared=1, top_k=2, d_expert=32, first_dense=1),
            engram=EngramConfig(layers=(1,), max_ngram=3, heads=2, table_sizes=(101, 101), d_mem=32)),
        "tiny-dense": lambda: _tiny_backbone(),
        "tiny-moe": lambda: _tiny_backbone(moe=MoEConfig(n_routed=16, **_TINY_MOE)),
        "tiny": lambda: _tiny_backbone(
            moe=MoEConfig(n_routed=12, **_TINY_MOE),
            engram=EngramConfig(layers=(1,), max_ngram=3, heads=2, table_sizes=(36392, 36392), d_mem=32)),
        "tiny-overencoding": lambda: _tiny_backbone(
            moe=MoEConfig(n_routed=12, **_TINY_MOE),
            overencoding=OverEncodingConfig(max_ngram=3, heads=1, table_sizes=(2274, 2274))),
        "small-moe": lambda: _small_backbone(moe=MoEConfig(n_routed=32, **_SMALL_MOE)),
        "small": lambda: _small_backbone(
            moe=MoEConfig(n_routed=25, **_SMALL_MOE),
            engram=EngramConfig(layers=(1,), max_ngram=3, heads=4, table_sizes=(300368, 300368), d_mem=64)),
        "dense-4b": lambda: _paper_backbone(hc_mult=4),
        "moe-27b": lambda: _paper_backbone(moe=_paper_moe(72)),
        "engram-27b": lambda: _paper_backbone(moe=_paper_moe(55), engram=_paper_engram(2_226_000)),
        "engram-40b": lambda: _paper_backbone(moe=_paper_moe(55), engram=_paper_engram(7_227_000)),
    }


PRESET_NAMES = tuple(_presets())


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named model config; ``overrides`` replace top-level fields (validated again)."""
    table = _presets()
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(table)}")
    cfg = table[name]()
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
