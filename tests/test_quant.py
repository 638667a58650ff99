"""Quantized rows: exact against DeepSeek-V4.1's dequantised rows and a per-value reference, idempotent
re-quantisation, stated error bounds, and refusals."""

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from engram.memory.quant import (
    QuantError,
    QuantizedRows,
    RowQuant,
    dequantize_rows,
    quantize_rows,
)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "v41")


@pytest.fixture(scope="module")
def v41_table() -> tuple[QuantizedRows, torch.Tensor]:
    state = load_file(os.path.join(GOLDEN, "state.safetensors"))
    want = load_file(os.path.join(GOLDEN, "outputs.safetensors"))["embed_dequant_rows_0_31"]
    return QuantizedRows(state["embed.weight"], state["embed.scale"]), want


def random_rows(n: int, width: int, seed: int) -> torch.Tensor:
    """Rows whose magnitudes span ~12 orders (per-row scale e^(3 N(0,1))), some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g) * torch.exp(3 * torch.randn(n, 1, generator=g))
    x[::17] = 0.0
    x[1::19, : width // 2] = 0.0
    return x


def e4m3_values() -> torch.Tensor:
    """Every finite float8_e4m3fn value, from its 256 bit patterns."""
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return v[torch.isfinite(v)]


# ------------------------------------------------------------------------------------------- exact


def test_dequantize_reproduces_v41_rows(v41_table):
    q, want = v41_table
    assert q.fmt == RowQuant("fp8_e4m3", 64) and q.fmt.scales_per_row == 2
    got = dequantize_rows(q, torch.bfloat16, chunk_rows=1000)
    assert torch.equal(got[:32], want)
    # the bf16 rounding is exact: fp32 and bf16 dequantisation agree on every row of the table
    assert torch.equal(dequantize_rows(q, torch.float32), got.float())


def test_dequantize_matches_a_per_value_reference(v41_table):
    q, _ = v41_table
    got = dequantize_rows(q.rows(100, 140))
    p, s = q.payload[100:140].float().tolist(), q.scales[100:140].view(torch.uint8).tolist()
    want = [[p[r][c] * 2.0 ** (s[r][c // 32] - 127) for c in range(64)] for r in range(40)]
    assert got.tolist() == want


@pytest.mark.parametrize("kind,width", [("fp8_e4m3", 64), ("fp8_e4m3", 256), ("fp8_e4m3", 48), ("fp8_e4m3", 1),
                                        ("int8", 64), ("int8", 5)])
def test_requantizing_dequantized_rows_gives_the_same_bytes(kind, width):
    x = random_rows(300, width, seed=width)
    q = quantize_rows(x, kind, chunk_rows=64)
    assert q.fmt == RowQuant(kind, width)
    assert quantize_rows(dequantize_rows(q), kind).equal(q)
    if kind == "fp8_e4m3":  # fp8 rows are exact in bf16 too
        assert quantize_rows(dequantize_rows(q, torch.bfloat16), kind).equal(q)


def test_chunk_size_and_input_dtype_do_not_change_results():
    x = random_rows(100, 64, seed=1)
    for kind in ("fp8_e4m3", "int8"):
        ref = quantize_rows(x, kind)
        assert all(quantize_rows(x, kind, chunk_rows=c).equal(ref) for c in (1, 7, 100, 10**6))
        assert torch.equal(dequantize_rows(ref, chunk_rows=3), dequantize_rows(ref))
    xb = x.bfloat16()
    assert quantize_rows(xb, "fp8_e4m3").equal(quantize_rows(xb.float(), "fp8_e4m3"))


# ------------------------------------------------------------------------------------------- bounds


def test_fp8_error_bound_scale_rule_and_nearest_rounding():
    x = random_rows(400, 64, seed=2)
    q = quantize_rows(x, "fp8_e4m3")
    s = q.scales.float().repeat_interleave(32, dim=1)  # [R, W], each value's scale
    err = (dequantize_rows(q) - x).abs()
    assert (err <= torch.maximum(2**-4 * x.abs(), 2**-10 * s)).all()  # half an e4m3 ulp
    # scale rule: the smallest power of two with max|x| <= 464 s, so block maxima land in [240, 448]
    amax = x.reshape(400, 2, 32).abs().amax(-1)
    pmax = q.payload.float().reshape(400, 2, 32).abs().amax(-1)
    nz = amax > 0
    assert ((pmax[nz] >= 240) & (pmax[nz] <= 448)).all()
    assert (amax[nz] <= 464 * q.scales.float()[nz]).all() and (amax[nz] > 232 * q.scales.float()[nz]).all()
    assert (q.scales.float()[~nz] == 1).all()
    # every payload is a nearest e4m3 value to x / s (brute force over all 253 finite values)
    y = (x / s)[:50].flatten()
    dist = (y[:, None] - e4m3_values()[None, :]).abs()
    assert torch.equal((q.payload[:50].float().flatten() - y).abs(), dist.min(1).values)


def test_int8_error_bound():
    x = random_rows(400, 96, seed=3)
    q = quantize_rows(x, "int8")
    assert q.payload.abs().max() <= 127 and q.scales.shape == (400, 1)
    s = q.scales
    assert ((dequantize_rows(q) - x).abs() <= s * (0.5 + 2**-16)).all()
    assert (s[x.abs().amax(1) == 0] == 0).all()


def test_extreme_magnitudes_stay_finite_and_in_range():
    x = torch.tensor([[3.0e38] * 32, [1e-40] * 32, [-448.0] + [0.0] * 31])
    q = quantize_rows(x, "fp8_e4m3")
    back = dequantize_rows(q)
    assert torch.isfinite(back).all() and torch.equal(back[2], x[2])
    assert math.isclose(back[0, 0].item(), 3.0e38, rel_tol=2**-4)


# ------------------------------------------------------------------------------------------- layout


def test_row_formats():
    assert (RowQuant("fp8_e4m3", 256).group, RowQuant("fp8_e4m3", 256).scales_per_row) == (32, 8)
    assert RowQuant("fp8_e4m3", 256).bytes_per_row == 264  # DeepSeek-V4.1: 256 values + 8 scale bytes
    assert (RowQuant("fp8_e4m3", 48).group, RowQuant("fp8_e4m3", 48).scales_per_row) == (48, 1)
    assert RowQuant("int8", 64).bytes_per_row == 68 and RowQuant("int8", 64).scale_dtype == torch.float32


# ------------------------------------------------------------------------------------------- refusals


def test_bad_input_is_refused_naming_the_problem(v41_table):
    q, _ = v41_table
    x = torch.randn(4, 64)
    with pytest.raises(QuantError, match="unknown quantization 'fp4'"):
        quantize_rows(x, "fp4")
    with pytest.raises(QuantError, match=r"must be \[rows, width >= 1\], got shape \(64,\)"):
        quantize_rows(x[0], "fp8_e4m3")
    with pytest.raises(QuantError, match="float32 or bfloat16 tensor, got torch.int64"):
        quantize_rows(torch.ones(2, 32, dtype=torch.long))
    bad = x.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(QuantError, match="row 2 holds a non-finite value"):
        quantize_rows(bad, "int8", chunk_rows=2)
    with pytest.raises(QuantError, match="chunk_rows must be a positive int"):
        quantize_rows(x, chunk_rows=0)
    with pytest.raises(QuantError, match=r"scales must be \[rows, scales per row\] = \[3, 2\], got \[3, 1\]"):
        dequantize_rows(QuantizedRows(q.payload[:3], q.scales[:3, :1]))
    with pytest.raises(QuantError, match="scales must be torch.float8_e8m0fnu, got torch.float32"):
        dequantize_rows(QuantizedRows(q.payload[:3], q.scales[:3].float()))
    with pytest.raises(QuantError, match="neither float8_e4m3fn nor int8"):
        dequantize_rows(QuantizedRows(q.payload[:3].float(), q.scales[:3]))
    nan_scale = q.scales[:3].clone()
    nan_scale.view(torch.uint8)[1, 0] = 255
    with pytest.raises(QuantError, match="row 1 has an e8m0 scale byte 255"):
        dequantize_rows(QuantizedRows(q.payload[:3], nan_scale))
    with pytest.raises(QuantError, match="dequantize to float32 or bfloat16"):
        dequantize_rows(q.rows(0, 3), torch.float16)
    with pytest.raises(QuantError, match=r"out must be torch.float32 \[3, 64\]"):
        dequantize_rows(q.rows(0, 3), out=torch.empty(3, 32))
    out = torch.empty(3, 64)
    assert dequantize_rows(q.rows(0, 3), out=out) is out
