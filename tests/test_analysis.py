"""Analysis tools: hooks (exact against the model's own outputs), LogitLens, CKA (against the direct O(n^2)
estimator in reference.py), n-gram counts and factual probes (against plain dictionaries), the Engram-off
ablation, and the files each tool writes, on a tiny model trained for a few steps."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from engram.analysis.ablate import retention, score_probes
from engram.analysis.cka import cka_matrix, compare_models, hsic_unbiased, linear_cka, soft_alignment
from engram.analysis.gates import gate_values, gates_html
from engram.analysis.hooks import engram_off, project_to_vocab, record_gates, record_hidden
from engram.analysis.lens import logit_lens
from engram.analysis.ngrams import distinct_ngrams, ngram_keys
from engram.analysis.probes import copy_probes, factual_probes, key_value_probes, word_tokens
from engram.config import TrainConfig, preset
from engram.data import load_tokenizer, write_token_dataset
from engram.data.shards import TokenDataset
from engram.model import build_model
from reference import ref_distinct_ngrams, ref_factual_contexts, ref_hsic_unbiased, ref_hsic_ustatistic, ref_linear_cka

# ------------------------------------------------------------------------------------------ fixtures


def _random_model(hc_mult: int = 1, gate: str = "per_branch", use_conv: bool = True, seed: int = 0):
    """The debug preset with every zero-initialised weight (residual outputs, W_V, conv) made random, so
    every block and the memory change the streams."""
    cfg = preset("debug", hc_mult=hc_mult)
    cfg = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, gate=gate, use_conv=use_conv))
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, 0.2)
    return model


MODES = [dict(), dict(hc_mult=4), dict(hc_mult=4, gate="single"), dict(use_conv=False)]


@pytest.fixture(scope="session")
def runs(mini_cache, tmp_path_factory):
    """Two tiny runs on `mini` sharing a tokenizer: Engram-MoE (the debug preset) and the same MoE
    without Engram, 150 steps each in fp32 (a few seconds)."""
    from engram.train.trainer import train

    root = tmp_path_factory.mktemp("analysis_runs")
    tcfg = TrainConfig(corpus="mini", tokenizer=str(mini_cache / "tok512.json"), steps=150, batch_size=8, seq_len=64,
                       eval_every=150, eval_batches=2, ckpt_every=150, warmup_steps=10, dtype="fp32", seed=0)
    engram_cfg = preset("debug")
    train(engram_cfg, tcfg, root / "engram", cache_dir=mini_cache, progress=False)
    train(dataclasses.replace(engram_cfg, engram=None), tcfg, root / "moe", cache_dir=mini_cache, progress=False)
    return {"engram": root / "engram", "moe": root / "moe", "cache": mini_cache}


# --------------------------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("mode", MODES, ids=["M1", "M4", "M4-single", "no-conv"])
def test_hooks_reproduce_the_models_own_gates_and_logits(mode):
    model = _random_model(**mode)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad(), record_gates(model) as gates, record_hidden(model) as hidden:
        out = model(ids, return_gates=True)
    assert gates.keys() == out.gates.keys() == {1}
    for blk in gates:
        assert torch.equal(gates[blk], out.gates[blk])
    assert sorted(hidden) == list(range(model.cfg.n_layers))
    with torch.no_grad():  # the last block read through the head is the model's prediction, exactly
        assert torch.equal(project_to_vocab(model, hidden[model.cfg.n_layers - 1]), out.logits)
    with torch.no_grad():  # hooks are gone after the context
        model(ids)
    assert all(not blk._forward_hooks for blk in model.blocks)


@pytest.mark.parametrize("mode", MODES, ids=["M1", "M4", "M4-single", "no-conv"])
def test_engram_off_equals_a_model_whose_value_projection_is_zero(mode):
    model = _random_model(**mode)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24))
    segs = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    with torch.no_grad():
        on = model(ids, segs).logits
        with engram_off(model):
            off = model(ids, segs).logits
        again = model(ids, segs).logits
        for layer in model.engram_layers().values():
            layer.fusion.value_proj.weight.zero_()
        zero_v = model(ids, segs).logits
    assert torch.equal(off, zero_v)
    assert torch.equal(on, again) and not torch.equal(on, off)


def test_engram_off_needs_an_engram_layer():
    cfg = dataclasses.replace(preset("debug"), engram=None)
    with pytest.raises(ValueError, match="no Engram layer"):
        with engram_off(build_model(cfg)):
            pass


# --------------------------------------------------------------------------------------------- gates


@pytest.mark.slow  # trains two tiny runs once (session fixture); the CLI examples cover this path too
def test_gate_values_windows_and_html(runs):
    from engram.data import eot_id
    from engram.infer import load_run

    lr = load_run(runs["engram"])
    bos = eot_id(lr.tokenizer)
    text = "O Romeo, Romeo! wherefore art thou Romeo? " * 6  # longer than the context: read in windows
    ids = lr.tokenizer.encode(text).ids
    assert len(ids) > lr.model.cfg.max_seq_len
    whole = gate_values(lr.model, lr.tokenizer, text, bos_id=bos)
    windowed = gate_values(lr.model, lr.tokenizer, text, bos_id=bos, window=10)
    assert whole["tokens"] == windowed["tokens"] and len(whole["gates"][1][0]) == len(ids)
    for start in (0, 10, 20):  # each window is what the model gives for that window alone, after the separator
        with torch.no_grad():
            out = lr.model(torch.tensor([[bos] + ids[start : start + 10]]), return_gates=True)
        assert windowed["gates"][1][0][start : start + 10] == out.gates[1][0, 1:, 0].tolist()
    # the same context for the first tokens (float32 kernels of another length round differently)
    assert whole["gates"][1][0][:10] == pytest.approx(windowed["gates"][1][0][:10], abs=1e-5)
    assert all(0.0 < g < 1.0 for g in whole["gates"][1][0])
    page = gates_html({"tokens": ["<b>", " x\n"], "gates": {1: [[0.1, 0.9]]}}, "t & t")
    assert page.startswith("<!DOCTYPE html>") and "&lt;b&gt;" in page and "t &amp; t" in page
    assert "http" not in page and "<script" not in page  # self-contained


@pytest.mark.slow  # trains two tiny runs once (session fixture); the CLI examples cover this path too
def test_gates_report_files(runs, tmp_path):
    from engram.analysis.runs import analyze_gates

    res = analyze_gates(runs["engram"], tmp_path, text="ROMEO: wherefore art thou")
    assert (tmp_path / "gates.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "gates.json").read_text())
    assert saved["tokens"] == res["values"]["tokens"] and list(saved["gates"]) == ["1"]
    assert all(tok.replace("\n", "") in (tmp_path / "gates.html").read_text() for tok in saved["tokens"] if tok.isalpha())
    with pytest.raises(ValueError, match="exactly one"):
        analyze_gates(runs["engram"], tmp_path, text="a", file="b")
    with pytest.raises(ValueError, match="no Engram layer"):
        analyze_gates(runs["moe"], tmp_path, text="ROMEO")


# ----------------------------------------------------------------------------------------- logit lens


@pytest.mark.slow  # trains two tiny runs once (session fixture); the CLI examples cover this path too
def test_logit_lens_last_block_is_zero_and_two_models_plot(runs, tmp_path):
    from engram.analysis.runs import analyze_logit_lens

    res = analyze_logit_lens([runs["engram"], runs["moe"]], tmp_path, corpus="mini", batches=2, cache_dir=runs["cache"])
    for curve in res["curves"].values():
        assert curve["kl"][-1] == 0.0  # the last block *is* the final distribution
        assert all(k > 0 for k in curve["kl"][:-1])
        assert curve["tokens"] > 500
    assert set(json.loads((tmp_path / "logit_lens.json").read_text())) == {"engram", "moe"}
    assert (tmp_path / "logit_lens.png").read_bytes()[:4] == b"\x89PNG"


def test_logit_lens_matches_a_direct_kl():
    from engram.data import Batch

    model = _random_model()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    batch = Batch(ids, targets, torch.zeros_like(ids))
    res = logit_lens(model, [batch])
    with torch.no_grad(), record_hidden(model) as hidden:
        p = model(ids).logits[:, :-1].double().softmax(-1)
        q0 = project_to_vocab(model, hidden[0])[:, :-1].double().softmax(-1)
    want = (p * (p.log() - q0.log())).sum(-1).mean()
    assert res["tokens"] == 30 and math.isclose(res["kl"][0], float(want), rel_tol=1e-5)


# ----------------------------------------------------------------------------------------------- CKA


def test_hsic_matches_the_direct_estimator_and_its_u_statistic():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    y[:, 0] += 2 * x[:, 0]
    K, L = (x @ x.T).tolist(), (y @ y.T).tolist()
    fast = hsic_unbiased(x, y)
    assert math.isclose(fast, ref_hsic_unbiased(K, L), rel_tol=1e-10)
    assert math.isclose(fast, ref_hsic_ustatistic(K, L), rel_tol=1e-9)
    x, y = torch.randn(40, 6, generator=g), torch.randn(40, 9, generator=g)
    y[:, :3] += x[:, :3]
    assert math.isclose(linear_cka(x, y), ref_linear_cka(x, y), rel_tol=1e-9)


def test_cka_properties():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert math.isclose(linear_cka(x, x), 1.0, rel_tol=1e-12)
    assert math.isclose(linear_cka(x, 3.0 * x @ q), 1.0, rel_tol=1e-9)  # orthogonal + isotropic scale
    assert abs(linear_cka(x, torch.randn(200, 16, generator=g, dtype=torch.float64))) < 0.1
    with pytest.raises(ValueError, match="same positions"):
        hsic_unbiased(x, x[:10])
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(x[:3], x[:3])


def test_soft_alignment_is_the_weighted_mean_index_of_the_top_k():
    m = torch.tensor([[0.9, 0.5, 0.1, 0.0], [0.1, 0.2, 0.8, 0.6]], dtype=torch.float64)
    got = soft_alignment(m, k=2)
    assert got == pytest.approx([(0.9 * 0 + 0.5 * 1) / 1.4, (0.8 * 2 + 0.6 * 3) / 1.4])
    assert soft_alignment(m, k=10) == pytest.approx([(0.5 + 0.2) / 1.5, (0.2 + 1.6 + 1.8) / 1.7])


@pytest.mark.slow  # trains two tiny runs once (session fixture); the CLI examples cover this path too
def test_cka_of_a_model_with_itself_has_a_unit_diagonal(runs, tmp_path):
    from engram.analysis.runs import analyze_cka

    res = analyze_cka(runs["engram"], runs["engram"], tmp_path, corpus="mini", batches=1, cache_dir=runs["cache"])
    m = torch.tensor(res["cka"])
    assert torch.allclose(m.diagonal(), torch.ones(len(m), dtype=m.dtype), atol=1e-12)
    assert res["alignment_a_in_b"] == pytest.approx(res["alignment_b_in_a"])
    two = analyze_cka(runs["engram"], runs["moe"], tmp_path, corpus="mini", batches=1, cache_dir=runs["cache"])
    assert len(two["cka"]) == 2 and all(-0.1 < v <= 1.0 + 1e-9 for row in two["cka"] for v in row)
    assert (tmp_path / "cka.png").read_bytes()[:4] == b"\x89PNG"


def test_cka_matrix_rows_and_columns():
    g = torch.Generator().manual_seed(2)
    a = [torch.randn(50, 8, generator=g) for _ in range(3)]
    m = cka_matrix(a, a[::-1])
    assert m.shape == (3, 3) and torch.allclose(m.flip(1).diagonal(), torch.ones(3, dtype=m.dtype))
    model = _random_model()
    from engram.data import Batch

    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    res = compare_models(model, model, [Batch(ids, ids, torch.zeros_like(ids))])
    assert res["tokens"] == 32 and res["alignment_a_in_b"] == pytest.approx([0.0, 1.0], abs=0.5)


# ------------------------------------------------------------------------------------ n-grams, probes


def _small_dataset(mini_cache, tmp_path, n_docs: int = 12):
    """The first documents of mini's training split, tokenised with the 512-id BPE (~100k tokens)."""
    from engram.data import prepare, prepare_tokens

    tok = load_tokenizer(mini_cache / "tok512.json")
    full = prepare_tokens(prepare("mini", mini_cache), tok, mini_cache, ("train",))["train"]
    docs = [(full.keys[i], np.asarray(full.doc(i))[:8000]) for i in range(n_docs)]
    write_token_dataset(iter(docs), tmp_path / "small", vocab_size=full.vocab_size, eot_id=full.eot_id)
    return TokenDataset(tmp_path / "small"), tok, [d for _, d in docs]


def test_ngram_counts_match_plain_sets(mini_cache, tmp_path):
    data, _, docs = _small_dataset(mini_cache, tmp_path)
    lookup = np.arange(data.vocab_size) // 3  # a surjection, like a compression map
    got = distinct_ngrams(data, (2, 3), lookup)
    for n in (2, 3):
        assert (got[n]["distinct"], got[n]["total"]) == ref_distinct_ngrams(docs, n, lookup)
    assert list(ngram_keys(np.array([1, 2, 3]), 2, 10)) == [12, 23] and len(ngram_keys(np.array([1]), 2, 10)) == 0


def test_factual_probes_follow_the_documented_procedure(mini_cache, tmp_path):
    data, tok, docs = _small_dataset(mini_cache, tmp_path)
    probes = factual_probes(data, tok, context=3, min_count=5, min_share=0.9, max_last_share=0.5, limit=1000)
    want = ref_factual_contexts(docs, 3, 5, 0.9, 0.5)
    assert len(probes) > 10
    for p in probes:
        ctx = p.prompt[1:]
        assert p.prompt[0] == 0 and want[ctx] == (p.answer, p.support)  # chosen by the reference's rule
        assert any(c.isalpha() for c in tok.decode([p.answer]))
    assert len({p.answer for p in probes}) == len(probes)  # one probe per answer token
    assert [p.support for p in probes] == sorted((p.support for p in probes), reverse=True)
    # deterministic, and the limit keeps the most frequent
    again = factual_probes(data, tok, context=3, min_count=5, limit=5)
    assert again == probes[:5]


def test_in_context_probes_are_seeded_and_answerable_from_the_prompt(mini_cache):
    tok = load_tokenizer(mini_cache / "tok512.json")
    assert len(word_tokens(tok)) >= 16
    for make in (copy_probes, key_value_probes):
        a, b, c = make(tok, 20, seed=3), make(tok, 20, seed=3), make(tok, 20, seed=4)
        assert a == b and a != c
        assert all(p.answer in p.prompt for p in a)
    kv = key_value_probes(tok, 5, pairs=4, seed=0)
    colon = tok.encode(":").ids[0]
    for p in kv:
        body = list(p.prompt[1:-2])
        key = p.prompt[-2]
        i = body.index(key)
        assert body[i + 1] == colon and body[i + 2] == p.answer
    cp = copy_probes(tok, 5, length=6, seed=0)
    for p in cp:
        words = list(p.prompt[1:7])
        j = len(p.prompt) - 8
        assert list(p.prompt[8:]) == words[:j] and p.answer == words[j]


def test_retention_counts_only_probes_right_with_engram():
    on = {"correct": torch.tensor([True, True, False, True]), "p_answer": torch.tensor([0.5, 0.4, 0.1, 0.8], dtype=torch.float64)}
    off = {"correct": torch.tensor([True, False, True, False]), "p_answer": torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=torch.float64)}
    r = retention(on, off)
    assert (r["probes"], r["right_on"], r["right_off_of_right_on"]) == (4, 3, 1)
    assert r["retention"] == pytest.approx(1 / 3) and r["p_retention"] == pytest.approx(0.7 / 1.7)
    none = retention({**on, "correct": torch.zeros(4, dtype=torch.bool)}, off)
    assert none["right_on"] == 0 and none["retention"] is None


@pytest.mark.slow  # trains two tiny runs once (session fixture); the CLI examples cover this path too
def test_ablation_on_a_trained_run(runs, tmp_path):
    from engram.analysis.runs import analyze_ablation
    from engram.infer import load_run

    res = analyze_ablation(runs["engram"], tmp_path, n_probes=50, n_in_context=20, heldout=1, cache_dir=runs["cache"])
    assert set(res["sets"]) == {"factual (training-data phrases)", "in-context: copy", "in-context: key-value"}
    fact = res["sets"]["factual (training-data phrases)"]
    assert fact["probes"] == 50 and 0 < fact["right_on"] <= 50  # a trained model completes some phrases
    assert 0.0 <= fact["retention"] <= 1.0
    assert res["heldout_loss"]["off"] > res["heldout_loss"]["on"]  # the memory is in use
    assert "| factual (training-data phrases) | 50 |" in (tmp_path / "ablation.md").read_text()
    assert json.loads((tmp_path / "ablation.json").read_text())["sets"].keys() == res["sets"].keys()
    # scoring agrees with a direct forward of one probe
    lr = load_run(runs["engram"])
    probe = copy_probes(lr.tokenizer, 1, seed=0)[0]
    s = score_probes(lr.model, [probe])
    with torch.no_grad():
        p = lr.model(torch.tensor([probe.prompt])).logits[0, -1].float().softmax(-1)
    assert math.isclose(float(s["p_answer"][0]), float(p[probe.answer]), rel_tol=1e-5)
    with pytest.raises(ValueError, match="no Engram layer"):
        analyze_ablation(runs["moe"], tmp_path, n_probes=5, n_in_context=5, heldout=0, cache_dir=runs["cache"])


# -------------------------------------------------------------------------------------------- errors


def test_bad_inputs_are_named(mini_cache, tmp_path):
    from engram.analysis.heldout import heldout_batches
    from engram.analysis.lens import autocast

    tok = load_tokenizer(mini_cache / "tok512.json")
    with pytest.raises(FileNotFoundError, match="no such text file"):
        heldout_batches(tok, file=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="exactly one"):
        heldout_batches(tok)
    with pytest.raises(ValueError, match="unknown corpus"):
        heldout_batches(tok, corpus="nope", cache_dir=mini_cache)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01binary")
    with pytest.raises(ValueError, match="blob.bin looks binary"):
        heldout_batches(tok, file=tmp_path / "blob.bin")
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="short.txt: .*too few tokens"):
        heldout_batches(tok, file=tmp_path / "short.txt")
    with pytest.raises(ValueError, match="single-token words, the in-context probes need 20000"):
        key_value_probes(tok, 1, pairs=10_000)
    with pytest.raises(ValueError, match="top-k"):
        soft_alignment(torch.eye(3), k=0)
    with pytest.raises(ValueError, match="dtype"):
        autocast(_random_model(), "fp16")


@pytest.mark.slow  # trains two tiny runs once (session fixture)
def test_cka_refuses_runs_with_different_tokenizers(runs, tmp_path, monkeypatch):
    import engram.analysis.runs as analysis_runs
    from engram.infer import load_run

    def load_other(path):
        lr = load_run(path)
        if str(path).endswith("moe"):
            lr.config = {**lr.config, "tokenizer": "another"}
        return lr

    monkeypatch.setattr(analysis_runs, "load_run", load_other)
    with pytest.raises(ValueError, match="different tokenizers"):
        analysis_runs.analyze_cka(runs["engram"], runs["moe"], tmp_path, corpus="mini", cache_dir=runs["cache"])
