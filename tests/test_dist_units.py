"""The single-process pieces of sharded training (fast, no processes): row ownership, the loader's rank
slices, per-group gradient clipping against a plain computation, the launcher's arguments, and a runtime
of one process. The multi-process behaviour is in test_dist.py (marker ``dist``)."""

import numpy as np
import pytest
import torch

from engram.dist import Runtime
from engram.dist.launch import launch_command, worker_argv
from engram.dist.sharded import RowSharding
from engram.train.optim import clip_grad_groups_


def test_contiguous_ranges_tile_the_table_and_owner_is_a_division():
    for rows, world in ((78, 2), (78, 3), (101, 4), (5, 5)):
        ranges = [RowSharding(rows, world, r).range_of(r) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        ids = torch.arange(rows)
        owner = RowSharding(rows, world, 0).owner(ids)
        for r, (a, b) in enumerate(ranges):
            assert bool((owner[a:b] == r).all())
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        RowSharding(3, 4, 0)
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        RowSharding(10, 2, 2)


def test_rank_slices_of_a_batch_are_the_global_batch(tmp_path):
    from engram.data.loader import EvalLoader, TrainLoader
    from engram.data.shards import TokenDataset, write_token_dataset

    rng = np.random.default_rng(0)
    docs = [(f"d{i}", rng.integers(1, 500, size=int(n))) for i, n in enumerate(rng.integers(20, 200, size=60))]
    ds = TokenDataset(write_token_dataset(docs, tmp_path / "ds", vocab_size=512, eot_id=0))
    whole = TrainLoader(ds, 6, 16, seed=3).make_batch(5)
    parts = [TrainLoader(ds, 6, 16, seed=3, shard=(r, 3)).make_batch(5) for r in range(3)]
    assert torch.equal(torch.cat([p.ids for p in parts]), whole.ids)
    assert torch.equal(torch.cat([p.targets for p in parts]), whole.targets)
    assert TrainLoader(ds, 6, 16, shard=(1, 2)).state_dict() == TrainLoader(ds, 6, 16).state_dict()  # resumable anywhere
    ev = [EvalLoader(ds, 4, 16, 2, shard=(r, 2)).make_batch(1) for r in range(2)]
    assert torch.equal(torch.cat([b.ids for b in ev]), EvalLoader(ds, 4, 16, 2).make_batch(1).ids)
    with pytest.raises(ValueError, match="batch size 6 .* is not divisible by the world size 4"):
        TrainLoader(ds, 6, 16, shard=(0, 4))


def _params():
    torch.manual_seed(0)
    dense = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
    for p in dense:
        p.grad = torch.randn_like(p) * 3
    table = torch.nn.Parameter(torch.randn(10, 2))
    idx = torch.tensor([[1, 4, 1, 7]])  # row 1 twice: counted once, summed
    table.grad = torch.sparse_coo_tensor(idx, torch.randn(4, 2) * 5, (10, 2), check_invariants=True)
    return dense, table


def _norms(dense, table):
    bb = torch.sqrt(sum((p.grad**2).sum() for p in dense))
    return float(bb), float(table.grad.coalesce().to_dense().norm())


@pytest.mark.parametrize("mode", ["per_group", "global", "backbone"])
def test_clipping_groups_against_a_plain_computation(mode):
    dense, table = _params()
    bb, tb = _norms(dense, table)
    want_dense = [p.grad.clone() for p in dense]
    want_table = table.grad.coalesce().to_dense()
    got = clip_grad_groups_(dense, [table], 1.0, mode)
    assert got == pytest.approx((bb, tb), rel=1e-6)
    total = (bb**2 + tb**2) ** 0.5
    f_bb = {"per_group": 1 / bb, "global": 1 / total, "backbone": 1 / bb}[mode]
    f_tb = {"per_group": 1 / tb, "global": 1 / total, "backbone": 1.0}[mode]
    for p, w in zip(dense, want_dense):
        torch.testing.assert_close(p.grad, w * f_bb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(table.grad.to_dense(), want_table * f_tb, rtol=1e-5, atol=1e-6)
    assert _norms(dense, table)[1] == pytest.approx(tb * f_tb, rel=1e-5)


def test_clipping_sums_the_table_norm_over_shards_and_zero_only_measures():
    dense, table = _params()
    bb, tb = _norms(dense, table)
    # as if a second shard held rows of the same squared norm: the table norm doubles its square
    got = clip_grad_groups_(dense, [table], 0.0, "per_group", lambda sq: sq * 2)
    assert got == pytest.approx((bb, tb * 2**0.5), rel=1e-6)
    assert _norms(dense, table) == pytest.approx((bb, tb), rel=1e-6)  # max_norm 0: nothing scaled
    with pytest.raises(ValueError, match="clipping mode must be one of"):
        clip_grad_groups_(dense, [table], 1.0, "tables")


def test_launcher_passes_every_argument_but_nproc():
    argv = ["train", "--nproc", "2", "--preset", "debug", "--nproc=3", "--out", "x"]
    assert worker_argv(argv) == ["train", "--preset", "debug", "--out", "x"]
    cmd = launch_command(2, argv)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    assert cmd[6:] == ["engram.cli", "train", "--preset", "debug", "--out", "x"]


def test_a_runtime_of_one_process():
    rt = Runtime.single()
    assert not rt.distributed and rt.is_main and rt.device == torch.device("cpu")
    t = torch.ones(3)
    assert rt.all_reduce_sum(t) is t and rt.all_gather_object(5) == [5] and rt.broadcast_object("a") == "a"
    assert rt.agree(lambda: 7, "x") == 7
    with pytest.raises(KeyError):
        rt.agree(lambda: {}["k"], "x")  # the own error, unchanged
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        Runtime("cpu", rank=2, world_size=2)
    with pytest.raises(ValueError, match="needs its process groups"):
        Runtime("cpu", rank=0, world_size=2)
    rt.close()  # nothing to leave
