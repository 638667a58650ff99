"""Key-name mappings for DeepSeek's Engram weights: bit-exact round trips and a clear refusal per mismatch.

Parity of the mapped weights with the reference outputs is in test_golden.py; this file checks the
mappings themselves on the golden state dicts (no tokenizer needed).
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from engram.config import EngramConfig
from engram.interop.deepseek import ReferenceFormatError, demo_to_engram, engram_to_v41, v41_to_engram
from engram.layers.engram import EngramFusion
from engram.memory.quant import QuantizedRows, dequantize_rows, quantize_rows
from engram.model import build_engram_layer

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@pytest.fixture(scope="module")
def demo_state() -> dict[str, torch.Tensor]:
    return load_file(os.path.join(GOLDEN, "demo", "state.safetensors"))


@pytest.fixture(scope="module")
def v41_state() -> dict[str, torch.Tensor]:
    return load_file(os.path.join(GOLDEN, "v41", "state.safetensors"))


def same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    def raw(t):
        return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t

    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(raw(a[k]), raw(b[k])) for k in a)


# ------------------------------------------------------------------------------------------ round trips


def test_v41_import_then_export_is_bit_exact(v41_state):
    ref = v41_to_engram(v41_state)
    assert isinstance(ref.table, QuantizedRows)  # the fp8 rows stay as stored
    assert same_bytes(engram_to_v41(ref.fusion, ref.table), v41_state)


def test_export_then_import_is_bit_exact(v41_state):
    """Our layer -> V4.1 -> ours gives back the same weights; a float table comes back as its fp8 rows,
    which equal it exactly when it already holds fp8 values (as an imported table does)."""
    torch.manual_seed(0)
    cfg = EngramConfig(layers=(1,), max_ngram=3, heads=2, table_sizes=(11, 13), d_mem=128, use_conv=False,
                       gate_norm_eps=1e-20)
    layer = build_engram_layer(cfg, 16, 4, [11, 13, 17, 19])
    layer.reset_parameters()
    with torch.no_grad():
        layer.table.weight.copy_(dequantize_rows(quantize_rows(layer.table.weight.detach())))  # fp8 values
    fusion = {k: v.detach() for k, v in layer.fusion.state_dict().items()}
    exported = engram_to_v41(fusion, layer.table.weight.detach())
    back = v41_to_engram(exported, norm_eps=1e-20, head_sizes=[11, 13, 17, 19])
    assert same_bytes(back.fusion, fusion)
    assert torch.equal(back.layer_state_dict(torch.float32)["table.weight"], layer.table.weight)
    assert same_bytes(engram_to_v41(back.fusion, back.table), exported)  # and exporting again: same bytes
    # a table loaded from V4.1 into a model (bf16 rows) exports to rows with the same values
    ref = v41_to_engram(v41_state)
    rows = ref.layer_state_dict()["table.weight"]
    again = engram_to_v41(ref.fusion, rows)
    assert torch.equal(dequantize_rows(QuantizedRows(again["embed.weight"], again["embed.scale"]), torch.bfloat16), rows)


def test_demo_mapping_layout(demo_state):
    ref = demo_to_engram(demo_state)
    f = ref.fusion
    assert torch.equal(f["key_proj.weight"][256 * 2 : 256 * 3], demo_state["key_projs.2.weight"])
    assert torch.equal(f["norm_q.weight"][1], demo_state["norm2.1.weight"])  # norm2 normalises the query
    assert torch.equal(f["norm_k.weight"][1], demo_state["norm1.1.weight"])  # norm1 the key
    assert torch.equal(f["short_conv.weight"][:, 0], demo_state["short_conv.conv.weight"][:, 0, 3])  # current tap
    assert ref.head_sizes == (503, 509, 521, 523, 541, 547, 557, 563, 1009, 1013, 1019, 1021, 1031, 1033, 1039, 1049)
    fusion = EngramFusion(256, 256, 4, 4, 3, bias=True)
    fusion.load_state_dict(f)  # every key has a place, strict


# ------------------------------------------------------------------------------------------ refusals


def edited(state, drop=(), **changes):
    out = {k: v for k, v in state.items() if k not in drop}
    out.update({k.replace("__", "."): v for k, v in changes.items()})
    return out


def test_v41_refusals_name_the_key(v41_state):
    s = v41_state
    cases = [
        (edited(s, drop=("q_weight",)), "missing key 'q_weight'"),
        (edited(s, wkv__scale=torch.ones(3, 12)), r"unexpected keys \['wkv.scale'\]"),
        (edited(s, embed__weight=s["embed.weight"].float()), "'embed.weight' has dtype torch.float32, expected float8_e4m3fn"),
        (edited(s, embed__scale=s["embed.scale"].view(torch.uint8)), "'embed.scale' has dtype torch.uint8, expected float8_e8m0fnu"),
        (edited(s, embed__scale=s["embed.scale"][:, :1]), r"'embed.scale' has shape \[14032, 1\], expected \[14032, 2\]"),
        (edited(s, wkv__weight=s["wkv.weight"][:256]), r"'wkv.weight' has shape \[256, 1536\], expected \[320, \*\]"),
        (edited(s, wkv__weight=s["wkv.weight"][:, :1500]), "'wkv.weight' reads 1500 inputs, not a multiple of the row width 64"),
        (edited(s, wkv__weight=s["wkv.weight"].to(torch.float8_e4m3fn)), "'wkv.weight' is float8_e4m3fn: quantized projections are not supported yet"),
        (edited(s, k_weight=s["k_weight"][:3]), r"'k_weight' has shape \[3, 64\], expected \[4, 64\]"),
        (edited(s, embed__weight=s["embed.weight"][:, :48], embed__scale=s["embed.scale"][:, :1]),
         "'embed.weight' rows are 48 wide; V4.1 rows are a multiple of 32"),
    ]
    for state, msg in cases:
        with pytest.raises(ReferenceFormatError, match=msg):
            v41_to_engram(state)
    with pytest.raises(ReferenceFormatError, match="'embed.weight' has 14032 rows for 24 heads; the hash layout has 14033"):
        v41_to_engram(s, head_sizes=[503] * 23 + [14033 - 503 * 23])
    with pytest.raises(ReferenceFormatError, match="hash layout has 16 heads of width 96"):
        v41_to_engram(s).engram_config(layers=(1,), max_ngram=3, heads=8, table_sizes=(503, 503))


def test_demo_refusals_name_the_key(demo_state):
    s = demo_state
    off = s["multi_head_embedding.offsets"]
    cases = [
        (edited(s, drop=("norm1.2.weight",)), "missing key 'norm1.2.weight'"),
        (edited(s, drop=("key_projs.1.weight", "key_projs.1.bias")), r"key_projs.\*.weight indices \[0, 2, 3\]"),
        (edited(s, extra=torch.zeros(1)), r"unexpected keys \['extra'\]"),
        (edited(s, multi_head_embedding__offsets=off.int()), "'multi_head_embedding.offsets' has dtype torch.int32"),
        (edited(s, multi_head_embedding__offsets=off.flip(0)), "'multi_head_embedding.offsets' = .* must start at 0"),
        (edited(s, short_conv__conv__weight=s["short_conv.conv.weight"][:, :, :3].reshape(1024, 3)),
         r"'short_conv.conv.weight' has shape \[1024, 3\], expected \[1024, 1, \*\]"),
        (edited(s, value_proj__bias=s["value_proj.bias"].long()), "'value_proj.bias' has dtype torch.int64, expected float32"),
        (edited(s, key_projs__3__weight=s["key_projs.3.weight"][:, :128]), r"'key_projs.3.weight' has shape \[256, 128\]"),
    ]
    for state, msg in cases:
        with pytest.raises(ReferenceFormatError, match=msg):
            demo_to_engram(state)
    sizes = list(demo_to_engram(s).head_sizes)
    sizes[3] += 2
    with pytest.raises(ReferenceFormatError, match="'multi_head_embedding.offsets': the weights hold head sizes"):
        demo_to_engram(s, head_sizes=sizes)


def test_export_refusals(v41_state):
    ref = v41_to_engram(v41_state)
    with pytest.raises(ReferenceFormatError, match=r"no place for \['short_conv.weight', 'value_proj.bias'\]"):
        engram_to_v41({**ref.fusion, "value_proj.bias": torch.zeros(64), "short_conv.weight": torch.zeros(256, 4)},
                      ref.table)
    with pytest.raises(ReferenceFormatError, match="missing key 'key_proj.weight'"):
        engram_to_v41({k: v for k, v in ref.fusion.items() if k != "key_proj.weight"}, ref.table)
    rows = ref.layer_state_dict(torch.float32)["table.weight"]
    with pytest.raises(ReferenceFormatError, match="table is int8 with 64 values per scale"):
        engram_to_v41(ref.fusion, quantize_rows(rows, "int8"))
    with pytest.raises(ReferenceFormatError, match="table rows are 320 wide; the projections read 1536"):
        engram_to_v41(ref.fusion, torch.ones(10, 320))
    with pytest.raises(ReferenceFormatError, match=r"must be \[rows, multiple of 32\]"):
        engram_to_v41(ref.fusion, rows[:, :48])
