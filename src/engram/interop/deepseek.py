"""DeepSeek's Engram state dicts <-> ours: the public demo (import) and DeepSeek-V4.1 (import and export).

Pure functions over state dicts (name -> tensor); they read no files. What each reference stores and how it
maps onto one of our Engram layers (``EngramLayer``: ``table.weight`` + ``fusion.*``), checked against the
reference outputs in tests/golden (docs/interop.md has the full table):

Public demo (``engram_demo_v1.py``), per layer, M branches of width D, H heads of width Dh, E = H * Dh:
    multi_head_embedding.embedding.weight [R, Dh]  -> table.weight (heads order-major, as our hasher)
    multi_head_embedding.offsets [H] int64         -> checked: the head sizes they imply
    value_proj.weight [D, E], .bias [D]            -> fusion.value_proj.weight, .bias
    key_projs.{i}.weight [D, E], .bias [D]         -> fusion.key_proj.weight / .bias rows [i D, (i+1) D)
    norm2.{i}.weight [D] (normalises the query)    -> fusion.norm_q.weight[i]
    norm1.{i}.weight [D] (normalises the key)      -> fusion.norm_k.weight[i]
    short_conv.norms.{i}.weight [D]                -> fusion.short_conv.norm.weight[i]
    short_conv.conv.weight [M D, 1, K] (oldest tap first) -> fusion.short_conv.weight [M D, K] (current first)
  settings: biases, gate-norm eps = fp32 machine epsilon, conv-norm eps 1e-5; the demo returns Y without
  the residual, which is what our fusion returns too.

DeepSeek-V4.1 (``inference/model.py``), per layer:
    embed.weight [R, W] float8_e4m3fn + embed.scale [R, W/32] float8_e8m0fnu -> the table (quantized rows)
    wkv.weight [(M+1) D, H W]: rows [i D, (i+1) D) = key of branch i, the last D rows = the value
                                                   -> fusion.key_proj.weight, fusion.value_proj.weight
    q_weight [M, D], k_weight [M, D]               -> fusion.norm_q.weight, fusion.norm_k.weight
  settings: no conv, no biases, gate-norm eps = the model's rms_norm_eps (1e-20 in the release); the
  reference returns h + alpha v, our block adds the same residual.

A V4.1 table stays quantized (``QuantizedRows``) until ``ReferenceLayer.layer_state_dict`` dequantizes it,
so export after import writes the same bytes back. Anything that does not fit is refused with a
``ReferenceFormatError`` naming the key.

Shape legend: R table rows, H heads, Dh = W head (row) width, E = H W retrieval width, M branches,
D model width, K conv taps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from engram.config import EngramConfig
from engram.memory.quant import FP8_BLOCK, QuantError, QuantizedRows, dequantize_rows, quantize_rows

StateDict = Mapping[str, torch.Tensor]

DEMO_GATE_NORM_EPS = float(torch.finfo(torch.float32).eps)  # nn.RMSNorm(eps=None) in fp32
DEMO_CONV_NORM_EPS = 1e-5
V41_NORM_EPS = 1e-20  # the released config's rms_norm_eps

# DeepSeek-V4.1's released hash layout (SPEC section 7): these EngramConfig fields with the DeepSeek
# tokenizer's compression map (99,092 canonical ids) give its multipliers, primes and row counts.
V41_HASH_LAYOUT: dict[str, Any] = dict(layers=(1, 14), max_ngram=4, heads=8, table_sizes=(16_000_000,) * 3,
                                       seed=0, pad_id=2)
V41_HEAD_DIM = 256


class ReferenceFormatError(ValueError):
    """A reference state dict whose keys, shapes or dtypes do not fit the expected layout."""


@dataclass(frozen=True)
class ReferenceLayer:
    """One Engram layer read from a reference's state dict, in our terms.

    ``fusion``: an ``EngramFusion`` state dict (our key names). ``table``: the rows as the reference
    stores them (fp32 tensor for the demo, fp8 ``QuantizedRows`` for V4.1). ``engram``: the
    ``EngramConfig`` fields the reference's settings imply (the hash layout is not in a state dict: pass it
    to ``engram_config``). ``head_sizes``: per-head table sizes when the state dict records them (demo).
    """

    fusion: dict[str, torch.Tensor]
    table: torch.Tensor | QuantizedRows
    engram: dict[str, Any]
    d_model: int
    hc_mult: int
    head_sizes: tuple[int, ...] | None = None

    def engram_config(self, **hash_layout: Any) -> EngramConfig:
        """An ``EngramConfig`` with these settings and ``hash_layout`` (layers, max_ngram, heads, table_sizes,
        seed, pad_id); refuses a layout whose head count or row width does not match the weights."""
        cfg = EngramConfig(**{**self.engram, **hash_layout})
        n_heads, width = self.engram["d_mem"] // self._row_width(), self._row_width()
        if cfg.total_heads != n_heads or cfg.d_head != width:
            raise ReferenceFormatError(
                f"hash layout has {cfg.total_heads} heads of width {cfg.d_head}; the weights hold "
                f"{n_heads} heads of width {width}"
            )
        return cfg

    def _row_width(self) -> int:
        rows = self.table.payload if isinstance(self.table, QuantizedRows) else self.table
        return int(rows.shape[1])

    def layer_state_dict(self, table_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """An ``EngramLayer`` state dict; a quantized table is dequantized to ``table_dtype`` (default: the
        dtype ``engram['table_dtype']`` names; bf16 for V4.1, which is exact and what it computes with)."""
        dtype = table_dtype or getattr(torch, self.engram["table_dtype"])
        rows = self.table
        rows = dequantize_rows(rows, dtype) if isinstance(rows, QuantizedRows) else rows.to(dtype)
        return {"table.weight": rows, **{f"fusion.{k}": v for k, v in self.fusion.items()}}


# ------------------------------------------------------------------------------------------- checks


def _take(state: StateDict, key: str, shape: Sequence[int | None], kind: str) -> torch.Tensor:
    """state[key], refusing a missing key, another rank/shape (None = any size) or dtype kind."""
    if key not in state:
        raise ReferenceFormatError(f"missing key {key!r}")
    t = state[key]
    if not isinstance(t, torch.Tensor):
        raise ReferenceFormatError(f"{key!r} is a {type(t).__name__}, not a tensor")
    if t.dim() != len(shape) or any(w is not None and w != g for w, g in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise ReferenceFormatError(f"{key!r} has shape {list(t.shape)}, expected {want}")
    ok = {
        "float": t.dtype in (torch.float32, torch.bfloat16, torch.float16),
        "int64": t.dtype == torch.int64,
        "fp8": t.dtype == torch.float8_e4m3fn,
        "e8m0": t.dtype == torch.float8_e8m0fnu,
    }[kind]
    if not ok:
        want = {"float": "float32, bfloat16 or float16", "int64": "int64", "fp8": "float8_e4m3fn",
                "e8m0": "float8_e8m0fnu"}[kind]
        raise ReferenceFormatError(f"{key!r} has dtype {t.dtype}, expected {want}")
    return t


def _refuse_unexpected(state: StateDict, expected: set[str]) -> None:
    extra = sorted(set(state) - expected)
    if extra:
        raise ReferenceFormatError(f"unexpected keys {extra}")


def _count_indexed(state: StateDict, prefix: str) -> int:
    """M for keys prefix.0.weight .. prefix.{M-1}.weight (refusing gaps)."""
    idx = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(re.escape(prefix) + r"\.(\d+)\.weight", k)))
    if idx != list(range(len(idx))):
        raise ReferenceFormatError(f"{prefix}.*.weight indices {idx} are not 0..{len(idx) - 1}")
    return len(idx)


def _head_sizes_from_offsets(offsets: torch.Tensor, rows: int, key: str) -> tuple[int, ...]:
    off = [int(x) for x in offsets.tolist()]
    ends = off[1:] + [rows]
    if not off or off[0] != 0 or any(e <= o for o, e in zip(off, ends)):
        raise ReferenceFormatError(f"{key!r} = {off} must start at 0 and increase strictly below {rows} rows")
    return tuple(e - o for o, e in zip(off, ends))


def _check_head_sizes(found: Sequence[int], expected: Sequence[int] | None, key: str) -> None:
    if expected is not None and tuple(int(x) for x in expected) != tuple(found):
        raise ReferenceFormatError(
            f"{key!r}: the weights hold head sizes {list(found)}, the hash layout has {list(expected)}"
        )


# ----------------------------------------------------------------------------------------- the demo


def demo_to_engram(state: StateDict, head_sizes: Sequence[int] | None = None) -> ReferenceLayer:
    """The demo's ``Engram`` state dict -> our layer. ``head_sizes`` (from our hasher), when given, must
    equal the sizes the demo's offsets record."""
    M = _count_indexed(state, "key_projs")
    if M == 0:
        raise ReferenceFormatError("missing key 'key_projs.0.weight'")
    D, E = _take(state, "value_proj.weight", (None, None), "float").shape
    rows = _take(state, "multi_head_embedding.embedding.weight", (None, None), "float")
    H = E // rows.shape[1]
    if H * rows.shape[1] != E:
        raise ReferenceFormatError(f"'value_proj.weight' reads {E} inputs, not a multiple of the row width {rows.shape[1]}")
    offsets = _take(state, "multi_head_embedding.offsets", (H,), "int64")
    found = _head_sizes_from_offsets(offsets, rows.shape[0], "multi_head_embedding.offsets")
    _check_head_sizes(found, head_sizes, "multi_head_embedding.offsets")
    K = _take(state, "short_conv.conv.weight", (M * D, 1, None), "float").shape[2]

    def stack(fmt: str, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.cat([_take(state, fmt.format(i), shape, "float") for i in range(M)])

    fusion = {
        "value_proj.weight": state["value_proj.weight"],
        "value_proj.bias": _take(state, "value_proj.bias", (D,), "float"),
        "key_proj.weight": stack("key_projs.{}.weight", (D, E)),
        "key_proj.bias": stack("key_projs.{}.bias", (D,)),
        "norm_q.weight": stack("norm2.{}.weight", (D,)).reshape(M, D),
        "norm_k.weight": stack("norm1.{}.weight", (D,)).reshape(M, D),
        "short_conv.norm.weight": stack("short_conv.norms.{}.weight", (D,)).reshape(M, D),
        "short_conv.weight": state["short_conv.conv.weight"][:, 0].flip(-1),  # newest tap first
    }
    expected = {"value_proj.weight", "value_proj.bias", "multi_head_embedding.embedding.weight",
                "multi_head_embedding.offsets", "short_conv.conv.weight"}
    for i in range(M):
        expected |= {f"key_projs.{i}.weight", f"key_projs.{i}.bias", f"norm1.{i}.weight", f"norm2.{i}.weight",
                     f"short_conv.norms.{i}.weight"}
    _refuse_unexpected(state, expected)
    engram = dict(d_mem=int(E), proj_bias=True, gate_norm_eps=DEMO_GATE_NORM_EPS, conv_norm_eps=DEMO_CONV_NORM_EPS,
                  use_conv=True, kernel_size=int(K), signed_sqrt=True, gate="per_branch", use_gate=True,
                  table_dtype="float32")
    return ReferenceLayer({k: v.contiguous() for k, v in fusion.items()}, rows, engram, int(D), M, found)


# ----------------------------------------------------------------------------------------- V4.1


def v41_to_engram(
    state: StateDict, norm_eps: float = V41_NORM_EPS, head_sizes: Sequence[int] | None = None
) -> ReferenceLayer:
    """A V4.1 ``Engram`` module's state dict (keys relative to the module) -> our layer. ``norm_eps`` is the
    model config's ``rms_norm_eps`` (not stored in the weights); ``head_sizes`` (from our hasher), when
    given, must add up to the table's rows and match its head count."""
    q_weight = _take(state, "q_weight", (None, None), "float")
    M, D = q_weight.shape
    k_weight = _take(state, "k_weight", (M, D), "float")
    payload = _take(state, "embed.weight", (None, None), "fp8")
    R, W = payload.shape
    if W % FP8_BLOCK:
        raise ReferenceFormatError(f"'embed.weight' rows are {W} wide; V4.1 rows are a multiple of {FP8_BLOCK}")
    scales = _take(state, "embed.scale", (R, W // FP8_BLOCK), "e8m0")
    if "wkv.weight" in state and state["wkv.weight"].dtype == torch.float8_e4m3fn:
        raise ReferenceFormatError(
            "'wkv.weight' is float8_e4m3fn: quantized projections are not supported yet (no reference output "
            "checks their dequantisation); pass it dequantized to float32 or bfloat16"
        )
    wkv = _take(state, "wkv.weight", ((M + 1) * D, None), "float")
    H = wkv.shape[1] // W
    if H * W != wkv.shape[1]:
        raise ReferenceFormatError(f"'wkv.weight' reads {wkv.shape[1]} inputs, not a multiple of the row width {W}")
    if head_sizes is not None and (len(head_sizes) != H or sum(head_sizes) != R):
        raise ReferenceFormatError(
            f"'embed.weight' has {R} rows for {H} heads; the hash layout has {sum(head_sizes)} rows "
            f"in {len(head_sizes)} heads"
        )
    _refuse_unexpected(state, {"q_weight", "k_weight", "embed.weight", "embed.scale", "wkv.weight"})
    fusion = {
        "value_proj.weight": wkv[M * D :].contiguous(),  # the value is the last D rows
        "key_proj.weight": wkv[: M * D].contiguous(),  # branch keys first, in branch order
        "norm_q.weight": q_weight.contiguous(),
        "norm_k.weight": k_weight.contiguous(),
    }
    engram = dict(d_mem=int(H * W), proj_bias=False, gate_norm_eps=float(norm_eps), use_conv=False,
                  signed_sqrt=True, gate="per_branch", use_gate=True, table_dtype="bfloat16")
    return ReferenceLayer(fusion, QuantizedRows(payload, scales), engram, int(D), int(M),
                          tuple(head_sizes) if head_sizes is not None else None)


def engram_to_v41(fusion: StateDict, table: torch.Tensor | QuantizedRows) -> dict[str, torch.Tensor]:
    """Our layer -> a V4.1 ``Engram`` state dict. ``fusion`` is an ``EngramFusion`` state dict without
    biases or conv (V4.1 has neither); ``table`` is fp8 rows in V4.1's layout (written unchanged) or float
    rows, quantized to that layout (``engram.memory.quant``; export after import is therefore bit-exact)."""
    allowed = {"value_proj.weight", "key_proj.weight", "norm_q.weight", "norm_k.weight"}
    extra = sorted(set(fusion) - allowed)
    if extra:
        raise ReferenceFormatError(f"V4.1 has no place for {extra} (it has no biases and no short conv)")
    norm_q = _take(fusion, "norm_q.weight", (None, None), "float")
    M, D = norm_q.shape
    norm_k = _take(fusion, "norm_k.weight", (M, D), "float")
    value = _take(fusion, "value_proj.weight", (D, None), "float")
    keys = _take(fusion, "key_proj.weight", (M * D, value.shape[1]), "float")
    if value.dtype != keys.dtype:
        raise ReferenceFormatError(f"'key_proj.weight' is {keys.dtype} but 'value_proj.weight' is {value.dtype}")
    q = _v41_table(table, int(value.shape[1]))
    return {"q_weight": norm_q, "k_weight": norm_k, "embed.weight": q.payload, "embed.scale": q.scales,
            "wkv.weight": torch.cat([keys, value], dim=0)}


def _v41_table(table: torch.Tensor | QuantizedRows, d_mem: int) -> QuantizedRows:
    """The table as fp8 rows with one e8m0 scale per 32 values, checked against the projections' width."""
    if not isinstance(table, QuantizedRows):
        if table.dim() != 2 or table.shape[1] % FP8_BLOCK:
            raise ReferenceFormatError(f"table rows {list(table.shape)} must be [rows, multiple of {FP8_BLOCK}] for V4.1")
        table = quantize_rows(table, "fp8_e4m3")
    try:
        fmt = table.fmt
    except QuantError as e:
        raise ReferenceFormatError(f"table: {e}") from None
    if fmt.kind != "fp8_e4m3" or fmt.group != FP8_BLOCK:
        raise ReferenceFormatError(f"table is {fmt.kind} with {fmt.group} values per scale; V4.1 stores fp8_e4m3 "
                                   f"with {FP8_BLOCK}")
    if d_mem % fmt.width:
        raise ReferenceFormatError(
            f"table rows are {fmt.width} wide; the projections read {d_mem} inputs, not a whole number of rows"
        )
    return table


__all__ = [
    "DEMO_CONV_NORM_EPS",
    "DEMO_GATE_NORM_EPS",
    "ReferenceFormatError",
    "ReferenceLayer",
    "V41_HASH_LAYOUT",
    "V41_HEAD_DIM",
    "V41_NORM_EPS",
    "demo_to_engram",
    "engram_to_v41",
    "v41_to_engram",
]
