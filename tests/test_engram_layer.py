"""Tables and fusion: float parity with tests/reference.py, conv identity at init, document isolation,
incremental conv == full, bad input."""

import pytest
import torch
from torch import nn

from engram.layers.engram import EngramFusion, EngramLayer, ShortConv
from engram.memory.table import EngramTable, TableLayoutError, check_layout
from reference import ref_fusion

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 fast path vs float64 reference


def make_fusion(M=2, conv=True, D=16, E=24, ssqrt=True, seed=0):
    torch.manual_seed(seed)
    f = EngramFusion(E, D, M, conv_kernel=4 if conv else None, conv_dilation=3, signed_sqrt=ssqrt)
    f.reset_parameters()
    with torch.no_grad():  # non-trivial norms and conv weights so the parity test means something
        for p in (f.norm_q.weight, f.norm_k.weight):
            p.uniform_(0.5, 1.5)
        if conv:
            f.short_conv.weight.normal_(0, 0.5)
            f.short_conv.norm.weight.uniform_(0.5, 1.5)
    return f


def ref_of(f, h, e, segments=None):
    c = f.short_conv
    return ref_fusion(
        h, e, f.value_proj.weight, f.key_proj.weight, f.norm_q.weight, f.norm_k.weight,
        c.norm.weight if c else None, c.weight if c else None, 3, f.use_signed_sqrt, segments,
    )


@pytest.mark.parametrize("M,conv,ssqrt", [(1, False, True), (1, True, True), (4, True, True), (2, True, False)])
def test_fusion_matches_reference(M, conv, ssqrt):
    f = make_fusion(M, conv, ssqrt=ssqrt)
    h, e = torch.randn(2, 11, M, 16), torch.randn(2, 11, 24)
    y, g = f(h, e)
    ry, rg = ref_of(f, h, e)
    assert y.shape == (2, 11, M, 16) and g.shape == (2, 11, M)
    torch.testing.assert_close(g.double(), rg, **TOL)
    torch.testing.assert_close(y.double(), ry, **TOL)


def test_fusion_with_segments_matches_reference():
    f = make_fusion(2, True)
    h, e = torch.randn(2, 14, 2, 16), torch.randn(2, 14, 24)
    seg = torch.tensor([[0] * 5 + [1] * 9, [0] * 2 + [1] * 2 + [2] * 10])
    y, _ = f(h, e, seg)
    ry, _ = ref_of(f, h, e, seg.tolist())
    torch.testing.assert_close(y.double(), ry, **TOL)


def test_conv_is_identity_at_init():
    f = EngramFusion(24, 16, 2, conv_kernel=4, conv_dilation=3)
    f.reset_parameters()
    f_noconv = EngramFusion(24, 16, 2, conv_kernel=None)
    f_noconv.load_state_dict({k: v for k, v in f.state_dict().items() if not k.startswith("short_conv")})
    h, e = torch.randn(1, 7, 2, 16), torch.randn(1, 7, 24)
    assert torch.equal(f(h, e)[0], f_noconv(h, e)[0])


def test_shortconv_matches_nn_conv1d():
    torch.manual_seed(0)
    sc = ShortConv(8, 2, 4, 3)
    with torch.no_grad():
        sc.weight.normal_()
    x = torch.randn(3, 20, 2, 8)
    conv = nn.Conv1d(16, 16, 4, groups=16, bias=False, padding=9, dilation=3)
    with torch.no_grad():
        conv.weight.copy_(sc.weight.flip(-1).unsqueeze(1))  # Conv1d tap K-1 is the current position
    z = sc.norm(x).reshape(3, 20, 16).transpose(1, 2)
    want = torch.nn.functional.silu(conv(z)[..., :20]).transpose(1, 2).reshape(3, 20, 2, 8)
    torch.testing.assert_close(sc(x), want, atol=1e-5, rtol=1e-5)


def test_fusion_incremental_equals_full():
    f = make_fusion(2, True)
    h, e = torch.randn(3, 13, 2, 16), torch.randn(3, 13, 24)
    full, _ = f(h, e)
    state = f.short_conv.init_state(3)
    outs = [f(h[:, t : t + 1], e[:, t : t + 1], conv_state=state)[0] for t in range(13)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-6, rtol=1e-6)


def test_fusion_causal_and_document_isolated():
    f = make_fusion(1, True)
    h, e = torch.randn(1, 12, 1, 16), torch.randn(1, 12, 24)
    y, _ = f(h, e)
    h2, e2 = h.clone(), e.clone()
    h2[:, 7:] += 1.0
    e2[:, 7:] -= 1.0
    assert torch.equal(f(h2, e2)[0][:, :7], y[:, :7])
    seg = torch.tensor([[0] * 5 + [1] * 7])
    packed, _ = f(h, e, seg)
    alone, _ = f(h[:, 5:], e[:, 5:])
    torch.testing.assert_close(packed[:, 5:], alone, atol=1e-6, rtol=1e-6)


def test_table_lookup_layout_and_sparse_grad():
    t = EngramTable([5, 7, 11], d_head=4)
    ids = torch.tensor([[[0, 6, 10], [4, 0, 3]]])  # [B=1, T=2, H=3]
    rows = t(ids)
    assert rows.shape == (1, 2, 3, 4)
    assert torch.equal(rows[0, 0, 1], t.weight[5 + 6]) and torch.equal(rows[0, 1, 2], t.weight[12 + 3])
    rows.sum().backward()
    assert t.weight.grad.is_sparse
    touched = set(t.weight.grad.coalesce().indices()[0].tolist())
    assert touched == {0, 11, 22, 4, 5, 15}


def test_table_dtypes_and_errors():
    assert EngramTable([3], 2, dtype="bfloat16").weight.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        EngramTable([3, 0], 2)
    with pytest.raises(ValueError):
        EngramTable([3], 2, dtype="float16")
    t = EngramTable([3, 5], 2)
    with pytest.raises(ValueError, match="heads"):
        t(torch.zeros(1, 1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        t.flat_ids(torch.tensor([[3, 0]]), check=True)
    assert t(torch.zeros(0, 2, dtype=torch.long)).shape == (0, 2, 2)


def test_layer_width_mismatch_and_layout_refusal():
    with pytest.raises(ValueError, match="width"):
        EngramLayer(EngramTable([3, 5], 4), EngramFusion(10, 16))
    layer = EngramLayer(EngramTable([3, 5], 4), EngramFusion(8, 16))
    y, g = layer(torch.randn(2, 3, 1, 16), torch.zeros(2, 3, 2, dtype=torch.long))
    assert y.shape == (2, 3, 1, 16)
    with pytest.raises(TableLayoutError, match="seed: 0 != 1"):
        check_layout({"seed": 0, "heads": 8}, {"seed": 1, "heads": 8})
    check_layout({"seed": 0}, {"seed": 0})


def test_fusion_bf16_autocast_close_to_fp32():
    f = make_fusion(2, True)
    h, e = torch.randn(2, 9, 2, 16), torch.randn(2, 9, 24)
    y32, _ = f(h, e)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, g16 = f(h, e)
    assert g16.dtype == torch.float32  # gate stays fp32 (dtype policy)
    torch.testing.assert_close(y16.float(), y32, atol=0.1, rtol=0.05)  # bf16 has ~3 significant digits


def test_meta_device_construction():
    with torch.device("meta"):
        t = EngramTable([10**9, 10**9 + 7], 64)
    assert t.weight.is_meta and t.num_rows == 2 * 10**9 + 7


def test_table_built_on_meta_then_loaded_looks_up_the_right_rows():
    """meta -> to_empty -> load_state_dict (no re-init) must give the same lookups as the source table."""
    src = EngramTable([5, 7, 11], d_head=4)
    with torch.device("meta"):
        t = EngramTable([5, 7, 11], d_head=4)
    t = t.to_empty(device="cpu")
    t.load_state_dict(src.state_dict())
    ids = torch.tensor([[[4, 6, 10], [0, 1, 2]]])
    assert torch.equal(t(ids), src(ids))
    assert list(src.state_dict()) == ["weight"]  # offsets are structure, not checkpoint state


# ------------------------------------------------------------------ reference settings: biases, eps, gate, mask


def make_fusion_with(M=2, conv=True, bias=False, gate_eps=1e-6, conv_eps=1e-6, use_gate=True, seed=0):
    torch.manual_seed(seed)
    f = EngramFusion(24, 16, M, conv_kernel=4 if conv else None, conv_dilation=3, bias=bias, gate_eps=gate_eps,
                     conv_eps=conv_eps, use_gate=use_gate)
    f.reset_parameters()
    with torch.no_grad():  # everything non-trivial, biases included
        for name, p in f.named_parameters():
            if name.endswith("bias") or name == "short_conv.weight":
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return f


def ref_of_with(f, h, e, token_mask=None):
    c = f.short_conv
    return ref_fusion(
        h, e, f.value_proj.weight, f.key_proj.weight if f.use_gate else None,
        f.norm_q.weight if f.use_gate else None, f.norm_k.weight if f.use_gate else None,
        c.norm.weight if c else None, c.weight if c else None, 3, True, None,
        value_b=f.value_proj.bias, key_b=f.key_proj.bias if f.use_gate and f.key_proj.bias is not None else None,
        gate_eps=f.norm_q.eps if f.use_gate else 0.0, conv_eps=c.norm.eps if c else 0.0, use_gate=f.use_gate,
        token_mask=token_mask,
    )


@pytest.mark.parametrize(
    "opts",
    [dict(bias=True), dict(gate_eps=1e-20, conv=False), dict(gate_eps=2**-23, conv_eps=1e-5, bias=True),
     dict(use_gate=False), dict(use_gate=False, conv=False)],
)
def test_fusion_options_match_reference(opts):
    f = make_fusion_with(**opts)
    h, e = torch.randn(2, 11, 2, 16) * 1e-3, torch.randn(2, 11, 24)  # small h: the epsilons matter
    mask = torch.rand(2, 11, generator=torch.Generator().manual_seed(0)) > 0.3
    for m in (None, mask):
        y, g = f(h, e, token_mask=m)
        ry, rg = ref_of_with(f, h, e, m)
        torch.testing.assert_close(g.double(), rg, **TOL)
        torch.testing.assert_close(y.double(), ry, **TOL)


def test_gate_epsilon_changes_small_hidden_states():
    """The reason the epsilon is a setting: with |h| ~ 1e-4 it dominates RMSNorm's denominator."""
    h, e = torch.randn(2, 9, 2, 16) * 1e-4, torch.randn(2, 9, 24)
    a = make_fusion_with(conv=False, gate_eps=1e-20)
    b = make_fusion_with(conv=False, gate_eps=1e-6)
    assert (a(h, e)[1] - b(h, e)[1]).abs().max() > 0.05


def test_default_state_dict_keys_are_unchanged_and_options_add_only_their_own():
    base = {"value_proj.weight", "key_proj.weight", "norm_q.weight", "norm_k.weight", "short_conv.weight",
            "short_conv.norm.weight"}
    assert set(EngramFusion(24, 16, 2).state_dict()) == base
    assert set(EngramFusion(24, 16, 2, bias=True).state_dict()) == base | {"value_proj.bias", "key_proj.bias"}
    assert set(EngramFusion(24, 16, 2, use_gate=False).state_dict()) == {
        "value_proj.weight", "short_conv.weight", "short_conv.norm.weight"}  # no unused gate parameters
    f = EngramFusion(24, 16, 2, bias=True)
    f.reset_parameters()
    assert not f.value_proj.bias.any() and not f.key_proj.bias.any()  # biases start at zero


def test_without_gate_alpha_is_one():
    f = make_fusion_with(conv=False, use_gate=False)
    h, e = torch.randn(2, 5, 2, 16), torch.randn(2, 5, 24)
    y, g = f(h, e)
    assert torch.equal(g, torch.ones(2, 5, 2))
    v = e @ f.value_proj.weight.T
    assert torch.equal(y, v.unsqueeze(2).expand(2, 5, 2, 16))


@pytest.mark.parametrize("conv", [False, True])
def test_token_mask_gives_exact_zero_at_masked_positions(conv):
    f = make_fusion_with(conv=conv)
    h, e = torch.randn(2, 12, 2, 16), torch.randn(2, 12, 24)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 4:7] = False
    mask[1, :3] = False
    y, g = f(h, e, token_mask=mask)
    assert not y[~mask].any() and not g[~mask].any()
    assert y[mask].abs().min() > 0
    with pytest.raises(ValueError, match=r"token_mask shape \(2, 11\)"):
        f(h, e, token_mask=mask[:, :11])


def test_token_mask_incremental_equals_full():
    f = make_fusion_with(conv=True)
    h, e = torch.randn(2, 10, 2, 16), torch.randn(2, 10, 24)
    mask = torch.rand(2, 10, generator=torch.Generator().manual_seed(3)) > 0.3
    full, _ = f(h, e, token_mask=mask)
    state = f.short_conv.init_state(2)
    outs = [f(h[:, t : t + 1], e[:, t : t + 1], conv_state=state, token_mask=mask[:, t : t + 1])[0] for t in range(10)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-6, rtol=1e-6)
