"""Optimisers: SparseRowAdam against torch.optim.SparseAdam / Adam, the paper's group split, Muon.

Tiers: exact (untouched rows, integer-valued reductions, state round trips), close (float updates against
torch.optim, tolerance in each test).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engram.layers.norms import RMSNorm
from engram.memory.table import EngramTable
from engram.train.optim import (
    TABLE_GROUP,
    EngramOptimizer,
    Muon,
    SparseRowAdam,
    build_optimizers,
    clip_grad_norm_,
    coalesce_rows,
    orthogonalize,
)


class StandIn(nn.Module):
    """Stand-in LM: token embedding, a sparse "engram table", norm, linear with bias, untied head."""

    def __init__(self, vocab: int = 40, rows: int = 300, d: int = 8) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.table = EngramTable([rows // 2, rows - rows // 2], d, name="table")
        self.norm = RMSNorm(d)
        self.proj = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def memory_tables(self) -> dict[str, EngramTable]:
        return {"table": self.table}

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # x (B, T), ids (B, T, H)
        h = self.tok(x) + self.table(ids).sum(-2)  # (B, T, D)
        h = h + self.proj(self.norm(h))
        return self.lm_head(h)  # (B, T, V)


def _lookup_loss(w: torch.Tensor, idx: torch.Tensor, target: torch.Tensor, sparse: bool) -> torch.Tensor:
    return ((F.embedding(idx, w, sparse=sparse) - target) ** 2).sum()


# ----------------------------------------------------------------------------------- coalesce_rows


def test_coalesce_rows_matches_torch_coalesce_exactly_on_integer_values():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (400,), generator=g)
    vals = torch.randint(-8, 8, (400, 3), generator=g).float()  # integer sums are order-independent
    grad = torch.sparse_coo_tensor(idx[None], vals, (1000, 3), check_invariants=True)
    rows, summed = coalesce_rows(grad)
    ref = grad.coalesce()
    assert torch.equal(rows, ref.indices()[0])
    assert torch.equal(summed, ref.values())
    rows2, summed2 = coalesce_rows(ref)  # already coalesced: passed through
    assert torch.equal(rows2, rows) and torch.equal(summed2, summed)


def test_coalesce_rows_bf16_values_reduce_in_fp32():
    idx = torch.tensor([3, 3, 3, 1])
    vals = torch.tensor([[1.0], [2.0**-9], [2.0**-9], [5.0]], dtype=torch.bfloat16)
    rows, summed = coalesce_rows(torch.sparse_coo_tensor(idx[None], vals, (10, 1), check_invariants=True))
    assert summed.dtype == torch.float32
    assert rows.tolist() == [1, 3]
    assert summed[1].item() == 1.0 + 2 * 2.0**-9  # would round to 1.0 if summed in bf16


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_sparse_matches_dense_clipping(max_norm):
    g = torch.Generator().manual_seed(10)
    w0, lin0 = torch.randn(20, 3, generator=g), torch.randn(3, 3, generator=g)
    idx, target = torch.randint(0, 20, (30,), generator=g), torch.randn(30, 3, generator=g)
    sparse_w, dense_w = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    lin_a, lin_b = nn.Parameter(lin0.clone()), nn.Parameter(lin0.clone())
    (_lookup_loss(sparse_w, idx, target, True) + (lin_a**2).sum()).backward()
    (_lookup_loss(dense_w, idx, target, False) + (lin_b**2).sum()).backward()
    norm = clip_grad_norm_([sparse_w, lin_a], max_norm)
    ref = torch.nn.utils.clip_grad_norm_([dense_w, lin_b], max_norm)
    torch.testing.assert_close(norm, ref)
    assert sparse_w.grad.is_sparse and sparse_w.grad.is_coalesced()
    torch.testing.assert_close(sparse_w.grad.to_dense(), dense_w.grad)
    torch.testing.assert_close(lin_a.grad, lin_b.grad)


# ----------------------------------------------------------------------------------- SparseRowAdam


@pytest.mark.parametrize("eps,tol", [(1e-12, 1e-6), (1e-8, 1e-5)])
def test_sparse_row_adam_matches_torch_sparse_adam(eps, tol):
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(200, 6, generator=g)
    ours, ref = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt = SparseRowAdam([ours], lr=1e-2, betas=(0.9, 0.99), eps=eps)
    opt_ref = torch.optim.SparseAdam([ref], lr=1e-2, betas=(0.9, 0.99), eps=eps)
    for _ in range(12):
        idx = torch.randint(0, 60, (5, 7), generator=g)  # repeats within a step and rows never touched
        target = torch.randn(5, 7, 6, generator=g)
        for p, o in ((ours, opt), (ref, opt_ref)):
            o.zero_grad()
            _lookup_loss(p, idx, target, sparse=True).backward()
            o.step()
    # SparseAdam puts eps outside the bias correction of v: identical updates only up to eps effects
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=tol, atol=tol)
    assert torch.equal(ours.detach()[60:], w0[60:])  # never-touched rows bit-identical


@pytest.mark.parametrize("bias_correction", ["global", "per_row"])
def test_rows_touched_every_step_match_dense_adam(bias_correction):
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(30, 4, generator=g)
    ours, ref = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt = SparseRowAdam([ours], lr=3e-2, betas=(0.8, 0.95), eps=1e-8, bias_correction=bias_correction)
    opt_ref = torch.optim.Adam([ref], lr=3e-2, betas=(0.8, 0.95), eps=1e-8, foreach=False)
    for _ in range(15):
        idx = torch.cat([torch.arange(30), torch.randint(0, 30, (20,), generator=g)])  # every row, some twice
        target = torch.randn(50, 4, generator=g)
        opt.zero_grad(), opt_ref.zero_grad()
        _lookup_loss(ours, idx, target, sparse=True).backward()
        _lookup_loss(ref, idx, target, sparse=False).backward()
        opt.step(), opt_ref.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-6, atol=1e-6)
    st = opt.state[ours]
    torch.testing.assert_close(st["exp_avg_sq"], opt_ref.state[ref]["exp_avg_sq"], rtol=1e-6, atol=1e-9)


def test_per_row_bias_correction_equals_dense_adam_on_the_steps_that_touched_the_row():
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(10, 3, generator=g)
    table = nn.Parameter(w0.clone())
    opt = SparseRowAdam([table], lr=5e-2, bias_correction="per_row")
    row = 4
    solo = nn.Parameter(w0[row : row + 1].clone())  # dense Adam on row 4 alone
    opt_solo = torch.optim.Adam([solo], lr=5e-2, foreach=False)
    for step in range(12):
        touch_row = step % 3 == 0
        idx = torch.tensor([row, 7] if touch_row else [7, 8])
        target = torch.randn(2, 3, generator=g)
        opt.zero_grad()
        _lookup_loss(table, idx, target, sparse=True).backward()
        opt.step()
        if touch_row:
            opt_solo.zero_grad()
            ((solo[0] - target[0]) ** 2).sum().backward()
            opt_solo.step()
    torch.testing.assert_close(table.detach()[row], solo.detach()[0], rtol=1e-6, atol=1e-6)
    assert opt.state[table]["row_step"].tolist() == [0, 0, 0, 0, 4, 0, 0, 12, 8, 0]
    assert opt.state[table]["step"] == 12


def test_untouched_rows_and_their_state_are_bit_identical():
    torch.manual_seed(4)
    table = nn.Parameter(torch.randn(1000, 4))
    opt = SparseRowAdam([table], lr=1e-2)
    idx1 = torch.tensor([1, 2, 3])
    _lookup_loss(table, idx1, torch.randn(3, 4), True).backward()
    opt.step()
    before_p, st = table.detach().clone(), opt.state[table]
    before_m, before_v = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
    opt.zero_grad()
    idx2 = torch.tensor([3, 500, 500])
    _lookup_loss(table, idx2, torch.randn(3, 4), True).backward()
    opt.step()
    keep = torch.ones(1000, dtype=torch.bool)
    keep[[3, 500]] = False
    assert torch.equal(table.detach()[keep], before_p[keep])
    assert torch.equal(st["exp_avg"][keep], before_m[keep]) and torch.equal(st["exp_avg_sq"][keep], before_v[keep])
    assert not torch.equal(table.detach()[500], before_p[500])


def test_step_with_no_rows_touched_changes_nothing_but_the_step_count():
    table = nn.Parameter(torch.randn(7, 3))
    before = table.detach().clone()
    opt = SparseRowAdam([table], lr=1e-1)
    empty = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3), (7, 3), check_invariants=True)
    table.grad = empty
    opt.step()
    assert torch.equal(table.detach(), before) and opt.state[table]["step"] == 1


def test_bf16_table_keeps_fp32_moments_and_tracks_fp32_run():
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(50, 8, generator=g)
    t16, t32 = nn.Parameter(w0.bfloat16()), nn.Parameter(w0.bfloat16().float())
    o16, o32 = SparseRowAdam([t16], lr=1e-2), SparseRowAdam([t32], lr=1e-2)
    for _ in range(5):
        idx, target = torch.randint(0, 50, (20,), generator=g), torch.randn(20, 8, generator=g)
        for p, o in ((t16, o16), (t32, o32)):
            o.zero_grad()
            _lookup_loss(p, idx, target.to(p.dtype), True).backward()
            o.step()
    assert t16.dtype == torch.bfloat16 and o16.state[t16]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(t16.detach().float(), t32.detach(), rtol=2e-2, atol=2e-2)


def test_dense_grad_falls_back_to_dense_adam_with_one_warning_or_errors():
    w0 = torch.randn(6, 2)
    ours, ref = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt = SparseRowAdam([ours], lr=1e-1)
    opt_ref = torch.optim.Adam([ref], lr=1e-1, foreach=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for p, o in ((ours, opt), (ref, opt_ref)):
                o.zero_grad()
                (p**2).sum().backward()
                o.step()
    assert sum("dense gradient" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-6, atol=1e-6)
    strict = SparseRowAdam([ours], dense_grad="error")
    (ours**2).sum().backward()
    with pytest.raises(RuntimeError, match="sparse=True"):
        strict.step()


def test_sparse_row_adam_rejects_bad_hyperparameters():
    p = nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError):
        SparseRowAdam([p], lr=-1.0)
    with pytest.raises(ValueError):
        SparseRowAdam([p], betas=(1.0, 0.9))
    with pytest.raises(ValueError):
        SparseRowAdam([p], bias_correction="rowwise")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias_correction", ["global", "per_row"])
def test_sparse_row_adam_state_dict_resume_is_exact(dtype, bias_correction):
    g = torch.Generator().manual_seed(6)
    batches = [(torch.randint(0, 40, (9,), generator=g), torch.randn(9, 4, generator=g)) for _ in range(8)]
    w0 = torch.randn(40, 4, generator=g).to(dtype)

    def run(p, opt, bs):
        for idx, target in bs:
            opt.zero_grad()
            _lookup_loss(p, idx, target.to(dtype), True).backward()
            opt.step()

    full = nn.Parameter(w0.clone())
    opt_full = SparseRowAdam([full], lr=1e-2, bias_correction=bias_correction)
    run(full, opt_full, batches)

    first = nn.Parameter(w0.clone())
    opt_first = SparseRowAdam([first], lr=1e-2, bias_correction=bias_correction)
    run(first, opt_first, batches[:4])
    saved = copy.deepcopy(opt_first.state_dict())
    second = nn.Parameter(first.detach().clone())
    opt_second = SparseRowAdam([second], lr=1e-2, bias_correction=bias_correction)
    opt_second.load_state_dict(saved)
    st = opt_second.state[second]
    assert st["exp_avg"].dtype == torch.float32
    if bias_correction == "per_row":
        assert st["row_step"].dtype == torch.int32
    run(second, opt_second, batches[4:])
    assert torch.equal(second.detach(), full.detach())


# ------------------------------------------------------------------------------ build_optimizers


def _groups(opt: EngramOptimizer) -> dict[str, dict]:
    return {g["name"]: g for g in opt.param_groups}


def test_build_optimizers_paper_split():
    model = StandIn()
    opt = build_optimizers(model, lr=4e-4, weight_decay=0.1, betas=(0.9, 0.95))
    groups = _groups(opt)
    assert set(groups) == {"backbone_decay", "backbone_no_decay", TABLE_GROUP}
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert by_group["backbone_decay"] == ["lm_head.weight", "proj.weight"]
    assert by_group["backbone_no_decay"] == ["norm.weight", "proj.bias", "tok.weight"]
    assert by_group[TABLE_GROUP] == ["table.weight"]
    assert groups["backbone_decay"]["weight_decay"] == 0.1 and groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert isinstance(opt.optimizers["tables"], SparseRowAdam)
    assert isinstance(opt.optimizers["adamw"], torch.optim.AdamW)
    assert groups[TABLE_GROUP]["lr"] == pytest.approx(5 * 4e-4)
    opt.set_lr_factor(0.316)
    lrs = opt.lrs()
    assert lrs[TABLE_GROUP] / lrs["backbone_decay"] == pytest.approx(5.0)
    assert lrs["backbone_decay"] == pytest.approx(0.316 * 4e-4)


def test_build_optimizers_every_param_in_exactly_one_group():
    model = StandIn()
    with pytest.raises(ValueError, match=r"in several: table.weight \(in engram_tables, engram_tables\)"):
        build_optimizers(model, lr=1e-3, table_params=[model.table.weight, model.table.weight])
    with pytest.raises(ValueError, match="not trainable parameters"):
        build_optimizers(model, lr=1e-3, table_params=[nn.Parameter(torch.zeros(2))])
    model.tok.weight.requires_grad_(False)  # frozen: in no group, and that is fine
    opt = build_optimizers(model, lr=1e-3)
    assert all(p is not model.tok.weight for g in opt.param_groups for p in g["params"])
    plain = nn.Sequential(nn.Linear(3, 3))  # no tables at all
    assert set(_groups(build_optimizers(plain, lr=1e-3))) == {"backbone_decay", "backbone_no_decay"}


def test_engram_optimizer_trains_stand_in_and_round_trips_state():
    torch.manual_seed(7)
    x, ids = torch.randint(0, 40, (4, 12)), torch.randint(0, 150, (4, 12, 2))
    model = StandIn()
    opt = build_optimizers(model, lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(model(x, ids).flatten(0, 1), x.flatten())
        loss.backward()
        assert model.table.weight.grad.is_sparse
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8
    clone = copy.deepcopy(model)
    opt2 = build_optimizers(clone, lr=1.0)  # lr etc. come back from the state dict
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.lrs() == opt.lrs()
    other = build_optimizers(nn.Linear(2, 2), lr=1.0)
    with pytest.raises(ValueError, match="members"):
        other.load_state_dict(opt.state_dict())


# --------------------------------------------------------------------------------------------- Muon


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
def test_orthogonalize_pushes_singular_values_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(8))
    u, s_in, vh = torch.linalg.svd(g, full_matrices=False)
    out = orthogonalize(g)
    s = torch.diagonal(u.T @ out @ vh.T)  # the output's gain along each input singular direction
    torch.testing.assert_close(u @ torch.diag(s) @ vh, out, atol=1e-4, rtol=0)  # same singular vectors
    # five quintic steps lift every singular value above ~1e-2 of the Frobenius norm into about [0.7, 1.2];
    # (near-)null directions of a square matrix stay small, as they should
    assert s.max() < 1.3
    assert s[s_in / g.norm() > 1e-2].min() > 0.6, s


def test_muon_descends_and_build_optimizers_routes_matrices():
    torch.manual_seed(9)
    w = nn.Parameter(torch.randn(8, 12) * 0.1)
    target = torch.randn(8, 12)
    opt = Muon([w], lr=0.1, weight_decay=0.0)
    first = ((w - target) ** 2).mean().item()
    for _ in range(30):
        opt.zero_grad()
        ((w - target) ** 2).mean().backward()
        opt.step()
    assert ((w - target) ** 2).mean().item() < 0.5 * first
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.zeros(3))])

    model = StandIn()
    eo = build_optimizers(model, lr=4e-4, backbone="muon")
    groups = _groups(eo)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in groups["backbone_muon"]["params"]] == ["proj.weight"]
    assert [names[id(p)] for p in groups["backbone_decay"]["params"]] == ["lm_head.weight"]
    x, ids = torch.randint(0, 40, (2, 5)), torch.randint(0, 150, (2, 5, 2))
    F.cross_entropy(model(x, ids).flatten(0, 1), x.flatten()).backward()
    eo.step()
    sd = copy.deepcopy(eo.state_dict())
    eo2 = build_optimizers(copy.deepcopy(model), lr=4e-4, backbone="muon")
    eo2.load_state_dict(sd)
    assert set(eo2.optimizers) == {"adamw", "muon", "tables"}


# ---------------------------------------------------------------------------------------- benchmark


def test_per_branch_norm_gains_and_biases_get_no_weight_decay():
    """[M, D] norm weights are 2-D but they are gains, not matrices: never decayed."""
    from engram.config import preset
    from engram.model import build_model

    model = build_model(preset("debug", hc_mult=2))
    groups = _groups(build_optimizers(model, lr=1e-3))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups["backbone_decay"]["params"]}
    assert not [n for n in decayed if "norm" in n or n.rsplit(".", 1)[-1].startswith("bias")]
    assert "blocks.1.engram.fusion.norm_q.weight" in {names[id(p)] for p in groups["backbone_no_decay"]["params"]}
    assert "blocks.1.engram.fusion.key_proj.weight" in decayed

