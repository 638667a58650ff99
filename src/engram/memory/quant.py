"""Quantized table rows: fp8 e4m3 with power-of-two scales (DeepSeek-V4.1's layout), or int8 per row.

A table of R rows of width W is stored as a payload and scales; every value is payload * its scale.

    format      payload                    scales                            values per scale
    fp8_e4m3    float8_e4m3fn [R, W]       float8_e8m0fnu [R, W / 32]        32 (W a multiple of 32)
    fp8_e4m3    float8_e4m3fn [R, W]       float8_e8m0fnu [R, 1]             W  (any other W)
    int8        int8 [R, W] in [-127, 127] float32 [R, 1]                    W

An e8m0 scale is one byte e meaning 2^(e - 127) (byte 255 is NaN and refused). The fp8 layout with
blocks of 32 is the one DeepSeek-V4.1 ships (``embed.weight`` + ``embed.scale``); dequantising it gives
the reference's rows exactly (tests/test_quant.py).

Quantisation rules (vectorised torch on the rows' device, in chunks of ``chunk_rows`` rows so the
temporaries stay bounded whatever R is):
- fp8: per block, the smallest power of two s with max|x| <= 464 s (464 = the largest value that rounds
  to e4m3's maximum, 448), then payload = round-to-nearest-even(x / s), saturated at +-448. An all-zero block
  gets s = 1. Exponents are clamped to e8m0's range [-127, 127]. With this rule the largest payload of a
  block lies in [240, 448], so re-quantising dequantised rows returns the same bytes (idempotent), which a
  rule based on 448 would not guarantee (a block whose maximum rounds down to 224 would change scale).
- int8: per row, s = max|x| / 127 (fp32; 0 for an all-zero row), payload = round(x / s).

Error bounds of dequantize(quantize(x)) in fp32, per value (tests check them on random rows):
- fp8: |x^ - x| <= max(2^-4 |x|, 2^-10 s): half an e4m3 ulp, relative for normal payloads and absolute
  for subnormal ones (scales of realistic rows are far above fp32's subnormal range, where this holds).
- int8: |x^ - x| <= s (1/2 + 2^-16): half a step, plus fp32 rounding of x / s and p * s.
Dequantising to bf16 rounds the fp32 value once more (exact for fp8 payloads: they have 3 mantissa bits).

Shape legend: R rows, W row width, S scales per row, G values per scale (W / S), N rows in one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

QuantKind = Literal["fp8_e4m3", "int8"]
QUANT_KINDS: tuple[str, ...] = ("fp8_e4m3", "int8")
FP8_BLOCK = 32  # values per scale in DeepSeek's fp8 layout
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FP8_LIMIT_MANTISSA = 464.0 / 512.0  # 464 = 0.90625 * 2^9: the largest |x/s| that still rounds to <= 448
_E8M0_BIAS = 127
_E8M0_NAN = 255
DEFAULT_CHUNK_ROWS = 65_536


class QuantError(ValueError):
    """Raised for rows or quantized data whose shape, dtype or values do not fit the format."""


@dataclass(frozen=True, slots=True)
class RowQuant:
    """How rows of one width are stored: payload and scale dtypes, scales per row, bytes per row."""

    kind: QuantKind
    width: int

    def __post_init__(self) -> None:
        if self.kind not in QUANT_KINDS:
            raise QuantError(f"unknown quantization {self.kind!r}; valid: {', '.join(QUANT_KINDS)}")
        if not isinstance(self.width, int) or self.width < 1:
            raise QuantError(f"row width must be a positive int, got {self.width!r}")

    @property
    def group(self) -> int:
        """Values sharing one scale: 32 for fp8 rows whose width is a multiple of 32, else the row."""
        if self.kind == "fp8_e4m3" and self.width % FP8_BLOCK == 0:
            return FP8_BLOCK
        return self.width

    @property
    def scales_per_row(self) -> int:
        return self.width // self.group

    @property
    def payload_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.kind == "fp8_e4m3" else torch.int8

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float8_e8m0fnu if self.kind == "fp8_e4m3" else torch.float32

    @property
    def bytes_per_row(self) -> int:
        scale_bytes = 1 if self.kind == "fp8_e4m3" else 4
        return self.width + self.scales_per_row * scale_bytes

    def check(self, payload: torch.Tensor, scales: torch.Tensor) -> None:
        """Refuse payload/scales that are not rows of this format, naming what differs."""
        if payload.dtype != self.payload_dtype:
            raise QuantError(f"{self.kind} payload must be {self.payload_dtype}, got {payload.dtype}")
        if scales.dtype != self.scale_dtype:
            raise QuantError(f"{self.kind} scales must be {self.scale_dtype}, got {scales.dtype}")
        if payload.dim() != 2 or payload.shape[1] != self.width:
            raise QuantError(f"{self.kind} payload must be [rows, {self.width}], got {tuple(payload.shape)}")
        want = (payload.shape[0], self.scales_per_row)
        if tuple(scales.shape) != want:
            raise QuantError(f"{self.kind} scales must be [rows, scales per row] = {list(want)}, got {list(scales.shape)}")


@dataclass(frozen=True)
class QuantizedRows:
    """Rows as payload [R, W] and scales [R, S]; ``fmt`` says how to read them."""

    payload: torch.Tensor
    scales: torch.Tensor

    @property
    def fmt(self) -> RowQuant:
        """The format these tensors are in (from their dtypes and shapes; refuses anything else)."""
        if self.payload.dtype == torch.float8_e4m3fn:
            kind: QuantKind = "fp8_e4m3"
        elif self.payload.dtype == torch.int8:
            kind = "int8"
        else:
            raise QuantError(f"payload dtype {self.payload.dtype} is neither float8_e4m3fn nor int8")
        if self.payload.dim() != 2:
            raise QuantError(f"payload must be [rows, width], got shape {tuple(self.payload.shape)}")
        fmt = RowQuant(kind, int(self.payload.shape[1]))
        fmt.check(self.payload, self.scales)
        return fmt

    @property
    def num_rows(self) -> int:
        return int(self.payload.shape[0])

    def rows(self, start: int, stop: int) -> QuantizedRows:
        """Rows [start, stop) as views."""
        return QuantizedRows(self.payload[start:stop], self.scales[start:stop])

    def equal(self, other: QuantizedRows) -> bool:
        """Bit-identical payload and scales (fp8 tensors compared as bytes)."""
        return (
            self.payload.dtype == other.payload.dtype
            and self.scales.dtype == other.scales.dtype
            and torch.equal(_bytes(self.payload), _bytes(other.payload))
            and torch.equal(_bytes(self.scales), _bytes(other.scales))
        )


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _check_chunk(chunk_rows: int) -> None:
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise QuantError(f"chunk_rows must be a positive int, got {chunk_rows!r}")


def _check_rows(rows_RW: torch.Tensor) -> None:
    if not isinstance(rows_RW, torch.Tensor) or rows_RW.dtype not in (torch.float32, torch.bfloat16):
        got = rows_RW.dtype if isinstance(rows_RW, torch.Tensor) else type(rows_RW).__name__
        raise QuantError(f"rows to quantize must be a float32 or bfloat16 tensor, got {got}")
    if rows_RW.dim() != 2 or rows_RW.shape[1] < 1:
        raise QuantError(f"rows to quantize must be [rows, width >= 1], got shape {tuple(rows_RW.shape)}")


def quantize_rows(
    rows_RW: torch.Tensor, kind: QuantKind = "fp8_e4m3", chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> QuantizedRows:
    """fp32 / bf16 rows [R, W] -> payload + scales in format ``kind`` (module docstring for the rules).

    Refuses non-finite values, naming the first row that holds one.
    """
    _check_rows(rows_RW)
    _check_chunk(chunk_rows)
    fmt = RowQuant(kind, int(rows_RW.shape[1]))
    R, dev = rows_RW.shape[0], rows_RW.device
    payload = torch.empty(R, fmt.width, dtype=fmt.payload_dtype, device=dev)
    scales = torch.empty(R, fmt.scales_per_row, dtype=fmt.scale_dtype, device=dev)
    for start in range(0, R, chunk_rows):
        x_NW = rows_RW[start : start + chunk_rows].float()
        finite = torch.isfinite(x_NW).all(1)
        if not bool(finite.all()):
            bad = start + int((~finite).nonzero()[0, 0])
            raise QuantError(f"row {bad} holds a non-finite value (inf or NaN); it cannot be quantized")
        quant = _quantize_fp8 if kind == "fp8_e4m3" else _quantize_int8
        quant(x_NW, fmt, payload[start : start + chunk_rows], scales[start : start + chunk_rows])
    return QuantizedRows(payload, scales)


def _quantize_fp8(x_NW: torch.Tensor, fmt: RowQuant, payload_NW: torch.Tensor, scales_NS: torch.Tensor) -> None:
    N, S, G = x_NW.shape[0], fmt.scales_per_row, fmt.group
    x_NSG = x_NW.reshape(N, S, G)
    amax_NS = x_NSG.abs().amax(-1)
    # smallest k with amax <= 464 * 2^k, from amax = m * 2^e (m in [0.5, 1)) exactly, without a log
    m_NS, e_NS = torch.frexp(amax_NS)
    k_NS = e_NS - 9 + (m_NS > _FP8_LIMIT_MANTISSA).to(e_NS.dtype)
    k_NS = torch.where(amax_NS == 0, torch.zeros_like(k_NS), k_NS).clamp(-_E8M0_BIAS, _E8M0_BIAS)
    scale_NS = (k_NS + _E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)
    y_NSG = x_NSG / scale_NS.to(torch.float32).unsqueeze(-1)  # division by a power of two: exact
    payload_NW.copy_(y_NSG.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(N, fmt.width))
    scales_NS.copy_(scale_NS)


def _quantize_int8(x_NW: torch.Tensor, fmt: RowQuant, payload_NW: torch.Tensor, scales_N1: torch.Tensor) -> None:
    scale_N1 = x_NW.abs().amax(-1, keepdim=True) / 127.0
    safe_N1 = torch.where(scale_N1 > 0, scale_N1, torch.ones_like(scale_N1))
    payload_NW.copy_((x_NW / safe_N1).round().clamp(-127, 127).to(torch.int8))
    scales_N1.copy_(scale_N1)


def dequantize_rows(
    q: QuantizedRows,
    dtype: torch.dtype = torch.float32,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """payload * scale per value -> [R, W] in ``dtype`` (fp32, or bf16 as DeepSeek-V4.1 rounds its rows).

    The product is formed in fp32 and rounded once to ``dtype``. ``out`` ([R, W], ``dtype``), when given,
    is filled and returned (e.g. a slice of a table or a pinned buffer).
    """
    fmt = q.fmt
    _check_chunk(chunk_rows)
    if dtype not in (torch.float32, torch.bfloat16):
        raise QuantError(f"dequantize to float32 or bfloat16, got {dtype}")
    R = q.num_rows
    if out is None:
        out = torch.empty(R, fmt.width, dtype=dtype, device=q.payload.device)
    elif out.dtype != dtype or tuple(out.shape) != (R, fmt.width):
        raise QuantError(f"out must be {dtype} [{R}, {fmt.width}], got {out.dtype} {list(out.shape)}")
    if fmt.kind == "fp8_e4m3":
        nan_scale = q.scales.view(torch.uint8) == _E8M0_NAN
        if bool(nan_scale.any()):
            row = int(nan_scale.nonzero()[0, 0])
            raise QuantError(f"row {row} has an e8m0 scale byte 255 (NaN)")
    S, G = fmt.scales_per_row, fmt.group
    for start in range(0, R, chunk_rows):
        p_NW = q.payload[start : start + chunk_rows]
        s_NS = q.scales[start : start + chunk_rows].to(torch.float32)
        x_NSG = p_NW.to(torch.float32).reshape(-1, S, G) * s_NS.unsqueeze(-1)
        out[start : start + chunk_rows] = x_NSG.reshape(-1, fmt.width).to(dtype)
    return out


__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "FP8_BLOCK",
    "FP8_MAX",
    "QUANT_KINDS",
    "QuantError",
    "QuantKind",
    "QuantizedRows",
    "RowQuant",
    "dequantize_rows",
    "quantize_rows",
]
