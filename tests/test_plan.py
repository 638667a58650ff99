"""The placement planner: exact accounting against the model, traffic, fit checks, the activation estimate
against saved-tensor measurements, the rows-per-token measurement, and the command line."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from engram.config import preset
from engram.hashing import NgramHasher
from engram.model import build_model
from engram.plan import (GiB, ParamCounts, PlacementError, PlanConfig, activation_bytes_per_token,
                         measure_rows_per_token, plan, smallest_world_size)


@pytest.fixture(scope="module")
def debug():
    cfg = preset("debug")
    return cfg, ParamCounts.of(cfg)


def test_param_counts_follow_the_model_and_optimizer_groups(debug):
    cfg, p = debug
    model = build_model(cfg, device="meta")
    c = model.param_counts()
    assert p.total == c["total"] and p.tables == c["engram_tables"] and p.backbone == c["total"] - c["engram_tables"]
    assert p.layer_rows == tuple(layer.table.num_rows for layer in model.engram_layers().values())
    from engram.train.optim import build_optimizers

    groups = {g["name"]: g["params"] for g in build_optimizers(model, lr=1e-3, backbone="muon").param_groups}
    assert p.muon == sum(q.numel() for q in groups["backbone_muon"]) > 0, "Muon's share is the trainer's own"
    assert all(q.ndim == 2 for q in groups["backbone_muon"])


def test_memory_items_exact(debug):
    cfg, p = debug
    W = 3
    pc = PlanConfig(world_size=W, batch_size=2, seq_len=16, optimizer="muon", optim_dtype="bf16")
    out = plan(cfg, pc, params=p)
    d = cfg.engram.d_head
    owned = sum(math.ceil(r / W) for r in p.layer_rows)
    assert out.memory["backbone weights"] == p.backbone * 4
    assert out.memory["backbone optimizer (muon)"] == (2 * (p.backbone - p.muon) + p.muon) * 2
    assert out.memory["table shard (owned rows)"] == owned * d * 4
    assert out.memory["table optimizer (owned rows)"] == 2 * owned * d * 4
    assert out.memory["activations"] == 2 * 16 * activation_bytes_per_token(cfg, 16)
    sharded = plan(cfg, dataclasses.replace(pc, backbone="sharded"), params=p)
    assert sharded.memory["backbone weights"] == pytest.approx(p.backbone * 4 / W)
    assert "all-to-all, deduplicated" not in out.traffic, "no rows-per-token figure, no all-to-all estimate"


def test_traffic_exact(debug):
    cfg, p = debug
    pc = PlanConfig(world_size=4, batch_size=2, seq_len=8, rows_per_token=1.5, wire_dtype="bf16")
    t = plan(cfg, pc, params=p).traffic
    per_row = 8 + 2 * cfg.engram.d_head * 2
    L = len(cfg.engram.layers)
    assert t["all-to-all, deduplicated"] == pytest.approx(L * 1.5 * 16 * 3 / 4 * per_row)
    assert t["all-to-all, without dedup"] == pytest.approx(L * 16 * cfg.engram.total_heads * 3 / 4 * per_row)
    assert t["backbone all-reduce (ring)"] == pytest.approx(2 * 3 / 4 * p.backbone * 4)


def test_fit_check_names_what_dominates(debug):
    cfg, p = debug
    out = plan(cfg, PlanConfig(world_size=1, batch_size=64, seq_len=64, memory_gib=1e-4), params=p)
    assert not out.fits(1e-4)
    with pytest.raises(PlacementError, match=r"needs .* GiB per rank, more than 0.0001 GiB \(largest: activations"):
        out.check_fits()
    assert "--backbone sharded" in str(pytest.raises(PlacementError, out.check_fits).value)
    assert out.fits(out.total / GiB)
    pc = PlanConfig(world_size=1, batch_size=1, seq_len=8, backbone="sharded")
    need = plan(cfg, dataclasses.replace(pc, world_size=4), params=p).total / GiB
    assert smallest_world_size(cfg, pc, need, params=p) <= 4
    assert smallest_world_size(cfg, pc, 1e-9, params=p, limit=8) is None


def test_bad_plan_config():
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        PlanConfig(world_size=0, batch_size=1, seq_len=1)
    with pytest.raises(ValueError, match="backbone must be 'replicated' or 'sharded'"):
        PlanConfig(world_size=1, batch_size=1, seq_len=1, backbone="fsdp")
    with pytest.raises(ValueError, match="optim_dtype must be fp32 or bf16"):
        PlanConfig(world_size=1, batch_size=1, seq_len=1, optim_dtype="fp8")
    with pytest.raises(ValueError, match="rows_per_token must be positive"):
        PlanConfig(world_size=1, batch_size=1, seq_len=1, rows_per_token=0)


def saved_bytes_per_token(cfg, T: int = 64) -> float:
    """Bytes autograd saves per token (bf16 autocast): the slope between batch 1 and 3, so per-step
    constants (bf16 copies of the weights) drop out."""

    def saved(B):
        torch.manual_seed(0)
        model = build_model(cfg).train()
        ids = torch.randint(0, cfg.vocab_size, (B, T))
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, targets=ids, return_logits=False)
        return sum(storages.values())

    return (saved(3) - saved(1)) / (2 * T)


@pytest.mark.parametrize("name,hc", [("tiny", 1), ("tiny", 4), ("tiny-dense", 1)])
def test_activation_estimate_within_25_percent_of_saved_tensors(name, hc):
    cfg = dataclasses.replace(preset(name), hc_mult=hc)
    est = activation_bytes_per_token(cfg, 64, packed=False)
    assert est == pytest.approx(saved_bytes_per_token(cfg), rel=0.25)
    assert activation_bytes_per_token(cfg, 64, checkpointing=True) < est


def test_rows_per_token_exact():
    h = NgramHasher(np.arange(40), layers=(1,), max_ngram=3, heads=2, table_sizes=(13, 17), pad_id=0)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 40, n) for n in (30, 50, 20, 70)]
    r = measure_rows_per_token(h, docs, batch=2, seq_len=16, max_steps=3)
    ids = np.concatenate(docs)[: 3 * 32]
    seg = np.repeat(np.arange(4), [30, 50, 20, 70])[: 3 * 32]
    offsets = np.cumsum([0] + h.head_sizes(1)[:-1])
    want = []
    for s in range(3):
        hashed = h(torch.tensor(ids[s * 32:(s + 1) * 32]).view(2, 16), torch.tensor(seg[s * 32:(s + 1) * 32]).view(2, 16))
        want.append(len(set((hashed[:, :, 0].numpy() + offsets).ravel().tolist())) / 32)
    assert r.unique == pytest.approx(np.mean(want)) and r.positions == 4 and r.steps == 3
    assert r.dedup_factor >= 1
    with pytest.raises(ValueError, match="less than one step of 4 x 100 tokens"):
        measure_rows_per_token(h, docs, batch=4, seq_len=100)


def test_layout_hasher_refuses_a_mismatched_tokenizer(mini_cache):
    from engram.plan import layout_hasher

    with pytest.raises(ValueError, match="the tokenizer has 512 ids, the preset's vocabulary 129,280"):
        layout_hasher(preset("engram-27b"), mini_cache / "tok512.json")
    with pytest.raises(ValueError, match="no Engram layers"):
        layout_hasher(preset("moe-27b"))


def test_plan_command(capsys):
    from engram.cli import main

    argv = ["plan", "--preset", "engram-27b", "--world-size", "8", "--batch-size", "1", "--seq-len", "4096",
            "--rows-per-token", "9.5", "--checkpointing", "--memory-gib", "80"]
    assert main(argv + ["--backbone", "sharded"]) == 0
    out = capsys.readouterr().out
    assert "table shard (owned rows)" in out and "all-to-all, deduplicated" in out and "fits in 80 GiB" in out
    assert main(argv) == 2  # replicated backbone: too big for 80 GiB
    captured = capsys.readouterr()
    assert "with --backbone sharded fits in 80 GiB from 8 ranks" in captured.out
    assert "engram plan: error: engram-27b on 8 ranks needs" in captured.err
