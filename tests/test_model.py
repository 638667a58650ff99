"""The model: shapes, causality, document isolation, decode == forward, token mask, accounting, presets,
configs saved by older versions, bad input."""

import dataclasses
import json
import os

import pytest
import torch

from engram.allocation import allocate, count
from engram.config import EngramConfig, ModelConfig, MoEConfig, OverEncodingConfig, PRESET_NAMES, preset
from engram.infer import generate, sample_next
from engram.model import EngramLM, build_model

DECODE_TOL = dict(atol=2e-4, rtol=2e-4)  # fp32: chunked vs full attention differ by reduction order only


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
        moe=MoEConfig(n_routed=4, n_shared=1, top_k=2, d_expert=16, first_dense=1),
        engram=EngramConfig(layers=(1, 2), max_ngram=3, heads=2, table_sizes=(53, 61), d_mem=16),
    )
    base.update(kw)
    return ModelConfig(**base)


def randomise(model: EngramLM) -> EngramLM:
    """Give zero-initialised branches (outputs, conv) random values so every path matters in tests."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and float(p.abs().sum()) == 0:
                p.normal_(0, 0.2)
            if name.endswith("short_conv.weight"):
                p.normal_(0, 0.3)
    return model.eval()


VARIANTS = {
    "engram-moe": small_cfg(),
    "engram-hc4": small_cfg(hc_mult=4),
    "engram-single-hc2": small_cfg(hc_mult=2, engram=dataclasses.replace(small_cfg().engram, gate="single")),
    "engram-noconv-dense": small_cfg(moe=None, engram=dataclasses.replace(small_cfg().engram, use_conv=False)),
    "engram-reference-options": small_cfg(engram=dataclasses.replace(
        small_cfg().engram, proj_bias=True, gate_norm_eps=1e-20, conv_norm_eps=1e-5)),
    "engram-nogate-hc2": small_cfg(hc_mult=2, engram=dataclasses.replace(small_cfg().engram, use_gate=False)),
    "moe-only": small_cfg(engram=None),
    "moe-tied-embeddings": small_cfg(engram=None, tie_embeddings=True),
    "overencoding": small_cfg(engram=None, overencoding=OverEncodingConfig(max_ngram=3, heads=2, table_sizes=(31, 37))),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_shapes_and_loss(name):
    torch.manual_seed(0)
    m = build_model(VARIANTS[name])
    ids = torch.randint(0, 97, (2, 10))
    out = m(ids, targets=ids, return_gates=True)
    assert out.logits.shape == (2, 10, 97)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    if VARIANTS[name].engram is not None:
        M = 1 if VARIANTS[name].engram.gate == "single" else VARIANTS[name].hc_mult
        assert set(out.gates) == set(VARIANTS[name].engram.layers)
        assert out.gates[1].shape == (2, 10, M)
    out.loss.backward()
    for table in m.memory_tables().values():
        assert table.weight.grad is not None and table.weight.grad.is_sparse


@pytest.mark.parametrize("name", ["engram-moe", "engram-hc4", "overencoding"])
def test_causality(name):
    m = randomise(build_model(VARIANTS[name]))
    ids = torch.randint(0, 97, (2, 12))
    ids2 = ids.clone()
    ids2[:, 7:] = (ids2[:, 7:] + 5) % 97
    with torch.no_grad():
        a, b = m(ids).logits, m(ids2).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_packed_documents_are_isolated():
    m = randomise(build_model(VARIANTS["engram-hc4"]))
    ids = torch.randint(0, 97, (1, 14))
    seg = torch.tensor([[0] * 6 + [1] * 8])
    with torch.no_grad():
        packed = m(ids, seg).logits
        first, second = m(ids[:, :6]).logits, m(ids[:, 6:]).logits
    torch.testing.assert_close(packed[:, :6], first, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed[:, 6:], second, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_equals_forward(name):
    """Token-by-token decoding of rows of different lengths gives the full forward's logits."""
    m = randomise(build_model(VARIANTS[name]))
    torch.manual_seed(3)
    lengths = [11, 6, 9]
    ids = torch.randint(0, 97, (3, 11))
    state = m.new_decode_state(3, 16)
    steps = []
    for t in range(11):
        active = torch.tensor([t < n for n in lengths])
        steps.append(m.decode_step(ids[:, t], state, active))
    for b, n in enumerate(lengths):
        with torch.no_grad():
            full = m(ids[b : b + 1, :n]).logits[0]
        got = torch.stack([steps[t][b] for t in range(n)])
        torch.testing.assert_close(got, full, **DECODE_TOL)
    assert state.lengths.tolist() == lengths


def test_prefill_then_decode_equals_forward():
    m = randomise(build_model(VARIANTS["engram-hc4"]))
    ids = torch.randint(0, 97, (2, 12))
    plen = torch.tensor([5, 8])
    state = m.new_decode_state(2, 16)
    logits = m.forward_chunk(ids[:, :8], state, plen)  # right-padded prompts
    nxt = torch.stack([ids[0, 5], ids[1, 8]])
    step = m.decode_step(nxt, state)
    with torch.no_grad():
        f0, f1 = m(ids[:1, :6]).logits[0], m(ids[1:, :9]).logits[0]
    torch.testing.assert_close(logits[0, :5], f0[:5], **DECODE_TOL)
    torch.testing.assert_close(step[0], f0[5], **DECODE_TOL)
    torch.testing.assert_close(step[1], f1[8], **DECODE_TOL)


def test_generate_greedy_matches_argmax_of_forward():
    m = randomise(build_model(VARIANTS["engram-moe"]))
    prompts = [[3, 4, 5], [7, 8]]
    out = generate(m, prompts, max_new_tokens=4, temperature=0.0)
    for p, gen in zip(prompts, out):
        seq = list(p)
        for tok in gen:
            with torch.no_grad():
                nxt = int(m(torch.tensor([seq])).logits[0, -1].argmax())
            assert nxt == tok
            seq.append(tok)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(m, [[]], 3)


def test_sample_next_top_k_top_p():
    logits = torch.tensor([[0.0, 5.0, 4.0, -10.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, 1, None, g)) for _ in range(20)}
    assert picks == {1}
    picks = {int(sample_next(logits, 1.0, None, 0.5, g)) for _ in range(50)}
    assert picks == {1}
    from engram.infer import check_sampling

    check_sampling(0, 0.0, 1, 1.0)
    for bad in ((1, -1.0, None, None), (1, float("inf"), None, None), (1, 1.0, 0, None), (1, 1.0, None, 0.0),
                (1, 1.0, None, 1.01), (-1, 1.0, None, None), (1.5, 1.0, None, None), (1, 1.0, True, None)):
        with pytest.raises(ValueError):
            check_sampling(*bad)


def test_tied_embeddings_share_one_initialised_tensor():
    m = build_model(VARIANTS["moe-tied-embeddings"])
    assert m.lm_head.weight is m.tok_emb.weight and torch.isfinite(m.tok_emb.weight).all()
    assert m.param_counts()["lm_head"] == 0  # counted once, as the embedding


def test_hyper_connections_m1_is_plain_residual_model():
    m = build_model(small_cfg(hc_mult=1))
    assert not any(".hc_" in n for n, _ in m.named_parameters())


def test_param_accounting_by_hand():
    """Counts of small_cfg worked out by hand (not by the model's own grouping rule)."""
    c = build_model(small_cfg()).param_counts()
    D, V = 32, 97
    attention = 3 * (D * 32 + 2 * D * 16 + 32 * D)  # wq 32x32, wk/wv 32x16 (2 kv heads of 8), wo 32x32
    dense_ffn = 3 * D * 48  # block 0 stays dense (first_dense=1)
    routed = 2 * 4 * 3 * 16 * D  # blocks 1-2: 4 experts x (w1, w3, w2) of 16 x 32
    shared = 2 * 3 * 16 * D
    router = 2 * 4 * D
    # distinct primes from 52 (order 2) and 60 (order 3), 2 heads each: layer 1 takes 53, 59 | 61, 67,
    # layer 2 the next unused ones: 71, 73 | 79, 83; rows are d_mem / 4 heads = 4 wide
    tables = (53 + 59 + 61 + 67 + 71 + 73 + 79 + 83) * 4
    engram_dense = 2 * (16 * D + 16 * D + D + D + 4 * D + D)  # W_V, W_K, q/k norms, conv kernel 4, conv norm
    norms = 3 * 2 * D + D
    want = dict(embedding=V * D, lm_head=V * D, attention=attention, dense_ffn=dense_ffn, moe_routed=routed,
                moe_shared=shared, moe_router=router, engram_tables=tables, engram_dense=engram_dense,
                overencoding_tables=0, hyper_connections=0, norms=norms)
    assert {k: c[k] for k in want} == want
    total = sum(want.values())
    assert c["total"] == total and c["P_tot"] == total - 2 * V * D
    assert c["moe_routed_active"] == routed // 2  # top-2 of 4
    assert c["P_act"] == c["P_tot"] - routed // 2 - tables and c["P_sparse"] == routed // 2 + tables
    m = build_model(small_cfg())
    f = m.flops_per_token(64)
    assert f["forward"] == 2 * (c["P_act"] - norms + V * D) + 2 * 3 * 64 * 4 * 8 and f["train"] == 3 * f["forward"]
    assert m.table_bytes() == 4 * tables


PAPER = {  # preset: (total params, Engram table params) from the paper
    "dense-4b": (4.1e9, 0),
    "moe-27b": (26.7e9, 0),
    "engram-27b": (26.7e9, 5.7e9),
    "engram-40b": (39.5e9, 18.5e9),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_presets_match_paper_counts(name):
    total, tables = PAPER[name]
    m = build_model(preset(name), device="meta")
    c = m.param_counts()
    assert abs(c["total"] - total) <= 0.05 * total
    assert abs(c["engram_tables"] - tables) <= 0.05 * max(tables, 1)
    assert all(p.is_meta for p in m.parameters())  # nothing real was allocated


def test_meta_engram_27b_allocates_no_memory():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    m = build_model(preset("engram-27b"), device="meta")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert m.param_counts()["total"] > 2.6e10
    assert (after - before) < 200 * 1024  # 26B fp32 params would be 100 GiB; allow 200 MiB of Python objects


def test_every_preset_builds_and_debug_runs():
    for name in PRESET_NAMES:
        assert count(preset(name))["total"] > 0
    m = build_model(preset("debug"))
    ids = torch.randint(0, 512, (2, 32))
    assert m(ids, targets=ids).loss.isfinite()


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_presets_are_the_solvers_allocation(name):
    cfg = preset(name)
    base = dataclasses.replace(preset(name + "-moe"), engram=dataclasses.replace(cfg.engram, table_sizes=(1,) * 2))
    a = allocate(base, 0.75)
    assert a.config == cfg
    ref = count(preset(name + "-moe"))
    assert abs(a.counts["P_tot"] - ref["P_tot"]) <= 0.01 * ref["P_tot"]
    assert abs(a.counts["P_act"] - ref["P_act"]) <= 0.01 * ref["P_act"]


def test_allocation_engram_share_tracks_rho():
    base = dataclasses.replace(preset("small-moe"), engram=preset("small").engram)
    shares = [allocate(base, rho).engram_share for rho in (1.0, 0.75, 0.5)]
    assert shares[0] == 0 and abs(shares[1] - 0.25) < 0.03 and abs(shares[2] - 0.5) < 0.03
    with pytest.raises(ValueError, match="rho"):
        allocate(base, 1.5)
    with pytest.raises(ValueError, match="Engram layout"):
        allocate(preset("small-moe"), 0.5)
    with pytest.raises(ValueError, match="MoE"):
        allocate(preset("tiny-dense"), 1.0)


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="valid presets: debug"):
        preset("nope")
    with pytest.raises(ValueError, match="must divide"):
        small_cfg(n_heads=5)
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(n_routed=2, top_k=3)
    with pytest.raises(ValueError, match="out of range"):
        small_cfg(engram=EngramConfig(layers=(3,), table_sizes=(5, 5), d_mem=16, heads=2))
    with pytest.raises(ValueError, match="d_mem"):
        EngramConfig(d_mem=30, heads=2)
    with pytest.raises(ValueError, match="max_ngram"):
        EngramConfig(max_ngram=1, table_sizes=())
    with pytest.raises(ValueError, match="heads"):
        EngramConfig(heads=0)
    with pytest.raises(ValueError, match="positive"):
        EngramConfig(table_sizes=(10, 0))
    m = build_model(small_cfg())
    with pytest.raises(ValueError, match="token id 97"):
        m(torch.tensor([[1, 97]]))
    with pytest.raises(TypeError):
        m(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="hash_ids shape"):
        m(torch.tensor([[1, 2]]), hash_ids=torch.zeros(1, 2, 1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="lookup covers"):
        EngramLM(small_cfg(), lookup=torch.arange(10))
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        m(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(TypeError, match="integers, got 1.5"):
        generate(m, [[1, 1.5]], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, [[1, 2]], -1)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(m, [[1], []], 2)
    assert m(torch.zeros(0, 4, dtype=torch.long)).logits.shape == (0, 4, 97)


def test_config_json_round_trip():
    from engram.config import diff_configs, from_dict, to_dict, to_json
    import json

    for name in PRESET_NAMES:
        cfg = preset(name)
        again = from_dict(ModelConfig, json.loads(to_json(cfg)))
        assert again == cfg
    a, b = to_dict(preset("tiny")), to_dict(preset("tiny-moe"))
    diffs = diff_configs(a, b)
    assert any(d.startswith("moe.n_routed") for d in diffs) and any(d.startswith("engram") for d in diffs)
    with pytest.raises(ValueError, match="unknown fields"):
        from_dict(ModelConfig, {**a, "bogus": 1})


def test_caller_hash_ids_are_range_checked_per_head():
    """An id past its head's table but inside the flat table would read a neighbouring head's row."""
    m = build_model(small_cfg())
    ids = torch.randint(0, 97, (2, 5))
    good = m.hash(ids)
    assert torch.equal(m(ids, hash_ids=good).logits, m(ids).logits)
    bad = good.clone()
    bad[1, 3, 1, 0] = 53  # layer 2's head 0 has 71 rows, layer 1's head 0 has 53: check the right one
    m(ids, hash_ids=bad)
    bad[1, 3, 0, 0] = 53
    with pytest.raises(ValueError, match=r"hash id 53 at batch 1, position 3, Engram layer 1, head 0 .* 53 rows"):
        m(ids, hash_ids=bad)
    with pytest.raises(ValueError, match="hash id -1"):
        m(ids, hash_ids=good.clone().fill_(-1))
    with pytest.raises(TypeError):
        m(ids, hash_ids=good.float())


def test_a_batch_without_targets_has_zero_loss_not_nan():
    m = build_model(small_cfg())
    ids = torch.randint(0, 97, (2, 6))
    out = m(ids, targets=torch.full_like(ids, -100))
    assert out.ce_loss.item() == 0.0
    out.loss.backward()
    grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(float(g.abs().sum()) == 0 for g in grads)
    t = ids.clone()
    t[:, :3] = -100
    ref = torch.nn.functional.cross_entropy(m(ids).logits[:, 3:].reshape(-1, 97), ids[:, 3:].reshape(-1))
    assert torch.allclose(m(ids, targets=t).ce_loss, ref, atol=1e-6)


def test_token_mask_reaches_hashing_and_gates_and_decoding():
    m = randomise(build_model(VARIANTS["engram-hc4"]))
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 3:5] = False  # e.g. image tokens
    mask[1, :2] = False  # e.g. left padding
    with torch.no_grad():
        out = m(ids, token_mask=mask, return_gates=True)
        precomputed = m(ids, hash_ids=m.hash(ids, token_mask=mask), token_mask=mask)
        unmasked = m(ids)
    assert torch.equal(m.hash(ids, token_mask=mask), m.hasher(ids, token_mask=mask))
    for gate in out.gates.values():
        assert not gate[~mask].any() and gate[mask].min() > 0
    assert torch.equal(out.logits, precomputed.logits)
    assert not torch.allclose(out.logits, unmasked.logits)
    state = m.new_decode_state(2, 16)
    steps = [m.forward_chunk(ids[:, :4], state, token_mask=mask[:, :4])]
    steps += [m.forward_chunk(ids[:, t : t + 1], state, token_mask=mask[:, t : t + 1]) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), out.logits, **DECODE_TOL)


def test_config_saved_before_the_interop_fields_still_loads_and_resumes():
    """A run config written by the code before proj_bias / gate_norm_eps / conv_norm_eps / use_gate existed."""
    from engram.config import TrainConfig, diff_configs, from_dict, to_dict, with_defaults
    from engram.train.trainer import _resume_key

    path = os.path.join(os.path.dirname(__file__), "fixtures", "config_before_interop_fields.json")
    with open(path) as f:
        old = json.load(f)
    assert "use_gate" not in old["model"]["engram"]
    cfg = from_dict(ModelConfig, old["model"])
    assert cfg == preset("debug")
    e = cfg.engram
    assert (e.proj_bias, e.gate_norm_eps, e.conv_norm_eps, e.use_gate) == (False, 1e-6, 1e-6, True)
    assert diff_configs(with_defaults(ModelConfig, old["model"]), to_dict(cfg)) == []
    # that run clipped the backbone alone (grad_clip_groups did not exist): it resumes so, and only so
    now = {"model": to_dict(cfg), "train": to_dict(TrainConfig(grad_clip_groups="backbone")), "tokenizer": "t"}
    assert diff_configs(_resume_key({**old, "tokenizer": "t"}), _resume_key(now)) == []
    today = {**now, "train": to_dict(TrainConfig())}
    assert diff_configs(_resume_key({**old, "tokenizer": "t"}), _resume_key(today)) == [
        "train.grad_clip_groups: 'backbone' != 'per_group'"]
    changed = {**now, "model": to_dict(dataclasses.replace(cfg, engram=dataclasses.replace(e, use_gate=False)))}
    assert diff_configs(_resume_key({**old, "tokenizer": "t"}), _resume_key(changed)) == [
        "model.engram.use_gate: True != False"]


def test_new_engram_fields_are_validated():
    for bad in (0.0, -1e-6, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="gate_norm_eps must be a positive finite number"):
            EngramConfig(gate_norm_eps=bad)
        with pytest.raises(ValueError, match="conv_norm_eps must be a positive finite number"):
            EngramConfig(conv_norm_eps=bad)
    cfg = EngramConfig(gate_norm_eps=1e-20)
    from engram.config import from_dict, to_json

    assert from_dict(EngramConfig, json.loads(to_json(cfg))) == cfg  # 1e-20 survives JSON
