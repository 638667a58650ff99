"""Sharded training with real processes on gloo (world sizes 2 and 3), against one process.

Equivalence tier: a sharded lookup, its backward, per-group clipping and the sparse optimizer give the
single-process rows; the whole trainer at world 2 gives the single-process losses at the same global
batch; a checkpoint saved at world 2 resumes at world 1 and 3 on the same losses. Faults: an incomplete
or inconsistent shard set is refused; a rank killed with SIGKILL makes the others fail with a clear error
within the collective timeout, and the last checkpoint stays loadable.

Tolerances: the ranks sum the same gradients in another order (per rank, then across ranks) than one
process does, so floats agree to rounding: rows and moments within 1e-5 after 4 Adam steps; losses
and gradient norms within 2e-5 relative over 8 training steps (measured: losses 1.4e-7, backbone
gradient norms 1.2e-7, table gradient norms 1.0e-6; the test prints them).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_problems
from dist_helpers import ROOT, assert_ok, run_job, worker_env
from engram.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from engram.config import TrainConfig, preset

pytestmark = pytest.mark.dist

LOSS_RTOL = 2e-5
ROW_TOL = dict(rtol=1e-5, atol=1e-5)


def single_process_lookup():
    """The lookup problem in one process: losses and the final rows and moments."""
    from engram.train.optim import SparseRowAdam, clip_grad_groups_

    table = dist_problems.make_table()
    opt = SparseRowAdam([table.weight], lr=dist_problems.LR)
    losses = []
    for step in range(dist_problems.STEPS):
        ids, target = dist_problems.batch(step)
        loss = (table(ids) * target).sum() / ids.numel()
        loss.backward()
        losses.append(float(loss.detach()))
        clip_grad_groups_([], [table.weight], dist_problems.MAX_NORM, "per_group")
        opt.step()
        opt.zero_grad()
    st = opt.state[table.weight]
    return losses, table.weight.detach(), st["exp_avg"], st["exp_avg_sq"]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_lookup_backward_and_updates_equal_one_process(world, tmp_path):
    job = run_job("lookup", world, tmp_path)
    assert_ok(job)
    losses, weight, m, v = single_process_lookup()
    parts = sorted(job.results, key=lambda r: r["range"])
    assert [p["range"] for p in parts][0][0] == 0 and parts[-1]["range"][1] == weight.shape[0]
    for p in parts:  # contiguous ranges; each rank holds only its rows and their moments
        a, b = p["range"]
        assert p["weight"].shape[0] == p["exp_avg"].shape[0] == b - a
        assert p["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)  # sums of signed terms: absolute
    torch.testing.assert_close(torch.cat([p["weight"] for p in parts]), weight, **ROW_TOL)
    torch.testing.assert_close(torch.cat([p["exp_avg"] for p in parts]), m, **ROW_TOL)
    torch.testing.assert_close(torch.cat([p["exp_avg_sq"] for p in parts]), v, **ROW_TOL)
    assert not torch.equal(weight, dist_problems.make_table().weight.detach())  # the rows did move
    stats = [p["stats"] for p in job.results]
    asked = dist_problems.STEPS * dist_problems.B // world * dist_problems.T * len(dist_problems.HEADS)
    assert all(s["rows"] == asked and s["distinct"] < asked for s in stats)  # duplicates were sent once


# ------------------------------------------------------------------------------------------- trainer


def tcfg(cache, **kw) -> dict:
    base = dict(tokenizer=str(cache / "tok512.json"), steps=8, batch_size=6, seq_len=32, eval_every=4,
                ckpt_every=4, eval_batches=2, warmup_steps=2, keep_checkpoints=2)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def reference(mini_cache, tmp_path_factory):
    """One process, 8 steps of a global batch of 6."""
    from engram.train.trainer import train

    run = tmp_path_factory.mktemp("ref") / "run"
    return train(preset("debug"), TrainConfig(**tcfg(mini_cache)), run, cache_dir=mini_cache, progress=False)


def cli_train(cache, out, nproc, *extra) -> subprocess.CompletedProcess:
    cfg = tcfg(cache)
    cmd = [sys.executable, "-m", "engram.cli", "train", "--preset", "debug", "--out", str(out), "--cache-dir",
           str(cache), "--tokenizer", cfg["tokenizer"], "--steps", "8", "--batch-size", "6", "--seq-len", "32",
           "--eval-every", "4", "--ckpt-every", "4", "--eval-batches", "2", "--warmup-steps", "2", "--no-progress",
           "--nproc", str(nproc), "--dist-timeout", "60", *extra]
    return subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def world2(mini_cache, tmp_path_factory):
    """`engram train --nproc 2` (torchrun, gloo): the same run in two processes."""
    out = tmp_path_factory.mktemp("w2") / "run"
    proc = cli_train(mini_cache, out, 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for key in ("train_loss", "val_loss", "grad_norm", "table_grad_norm"):
        a = [r.get(key) for r in got]
        b = [r.get(key) for r in want]
        assert [x is None for x in a] == [x is None for x in b], key
        a, b = [x for x in a if x is not None], [x for x in b if x is not None]
        print(f"{key}: largest relative difference {max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)):.1e}")
        assert a == pytest.approx(b, rel=LOSS_RTOL), key


def test_two_processes_train_like_one(world2, reference):
    out, proc = world2
    assert "trained debug to step 8" in proc.stdout  # rank 0 alone reports
    assert_same_losses(metrics(out), reference.metrics)
    ck = latest_checkpoint(out / "checkpoints")
    files = sorted(p.name for p in ck.glob("table.engram.1.*"))
    rows = json.loads((ck / "manifest.json").read_text())["tables"]["engram.1"]["rows"]
    half = -(-rows // 2)
    assert files == sorted([f"table.engram.1.rows-0-{half}.safetensors", f"table.engram.1.rows-{half}-{rows}.safetensors"])
    assert not list((out / "checkpoints").glob(".tmp-*"))
    # the model of the two-process run (tables gathered from both shards) is that of the single-process one
    ref_sd = reference.model.state_dict()
    for k, v in _fresh_model(out).state_dict().items():
        torch.testing.assert_close(v, ref_sd[k], rtol=1e-4, atol=1e-5, msg=k)


def _fresh_model(run_dir: Path):
    """The model of a run's newest checkpoint, loaded by one process (whatever world size saved it)."""
    from engram.infer.run import load_run

    return load_run(run_dir).model


def _only_checkpoint(src: Path, dst: Path, step: int) -> Path:
    """A copy of run ``src`` whose newest checkpoint is ``step`` (later ones removed)."""
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").glob("step_*"):
        if int(d.name.split("_")[1]) > step:
            shutil.rmtree(d)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    return dst


def test_a_world2_checkpoint_resumes_at_world1_and_world3(world2, reference, mini_cache, tmp_path):
    from engram.train.trainer import train

    out, _ = world2
    one = _only_checkpoint(out, tmp_path / "w1", 4)
    res = train(preset("debug"), TrainConfig(**tcfg(mini_cache)), one, cache_dir=mini_cache, progress=False,
                resume=True)
    assert res.step == 8
    assert_same_losses(metrics(one), reference.metrics)
    three = _only_checkpoint(out, tmp_path / "w3", 4)
    job = run_job("train", 3, tmp_path / "job3", dict(train=tcfg(mini_cache), run_dir=str(three),
                                                       cache_dir=str(mini_cache), resume=True, timeout=60))
    assert_ok(job)
    assert_same_losses(metrics(three), reference.metrics)
    ck = latest_checkpoint(three / "checkpoints")
    assert len(list(ck.glob("table.engram.1.rows-*"))) == 3  # saved again in three shards


def test_incomplete_or_mixed_shard_sets_are_refused(world2, tmp_path):
    out, _ = world2
    model = _fresh_model(out)
    ck = tmp_path / "ck"
    shutil.copytree(latest_checkpoint(out / "checkpoints"), ck)
    manifest = json.loads((ck / "manifest.json").read_text())
    entry = manifest["tables"]["engram.1"]
    (a, b, first), second = entry["ranges"]
    lost = json.loads(json.dumps(manifest))
    lost["tables"]["engram.1"]["ranges"] = [second]  # a rank's shard missing from the set
    (ck / "manifest.json").write_text(json.dumps(lost))
    with pytest.raises(CheckpointError, match=r"incomplete .*shard set for table 'engram.1': rows \[0, \d+\) are in no file"):
        load_checkpoint(ck, model, None, expected_config=None)
    mixed = json.loads(json.dumps(manifest))  # shards of two layouts (world 2 and world 1) in one set
    mixed["tables"]["engram.1"]["ranges"] = [[a, b, first], [0, entry["rows"], first]]
    (ck / "manifest.json").write_text(json.dumps(mixed))
    with pytest.raises(CheckpointError, match="are in two files"):
        load_checkpoint(ck, model, None, expected_config=None)
    (ck / "manifest.json").write_text(json.dumps(manifest))
    (ck / first).unlink()  # a shard file lost
    with pytest.raises(CheckpointError, match="checkpoint file missing"):
        load_checkpoint(ck, model, None, expected_config=None)


def test_a_killed_rank_fails_the_others_quickly_and_the_last_checkpoint_loads(mini_cache, tmp_path):
    from engram.train.trainer import train

    run = tmp_path / "run"
    timeout = 20
    job = run_job("train", 2, tmp_path / "job", dict(train=tcfg(mini_cache), run_dir=str(run), cache_dir=str(mini_cache),
                                                      timeout=timeout),
                  env_of_rank={1: {"ENGRAM_FAULTS": "train.step=kill@5"}}, limit_s=180)
    assert job.returncodes[1] == -9  # killed at the start of step 5, after the checkpoint of step 4
    assert job.returncodes[0] == 3, job.stderr[0][-2000:]
    first = next(line for line in job.stderr[0].splitlines() if line.startswith("FAILED"))
    assert first.startswith("FAILED CollectiveError: rank 0 of 2 on cpu: a collective failed while training step 5")
    assert "another rank died" in first
    # rank 0 wrote step 4's metrics just before rank 1 died at the start of step 5
    failed_at = float((tmp_path / "job" / "out" / "rank0.failed_at").read_text())
    waited = failed_at - (run / "metrics.jsonl").stat().st_mtime
    print(f"rank 0 failed {waited:.2f} s after the last step it completed")
    assert waited < timeout  # a dead peer closes its sockets: no wait for the timeout at all
    assert latest_checkpoint(run / "checkpoints").name == "step_00000004"
    res = train(preset("debug"), TrainConfig(**tcfg(mini_cache, steps=6)), run, cache_dir=mini_cache,
                progress=False, resume=True)
    assert res.step == 6


def test_bench_shard_quick(mini_cache):
    from engram.bench import shard

    res = shard.run(**shard.QUICK, cache_dir=str(mini_cache))
    by = {(t["world"], t["ownership"]): t for t in res["traffic"]}
    for t in by.values():  # deduplication can only shrink the traffic; both ownerships balance the rows
        assert 0 < t["bytes_per_token_dedup"] < t["bytes_per_token_no_dedup"]
        assert 1.0 <= t["served_max_over_mean"] < 1.5
    assert [t["world"] for t in res["timing"]] == [1, 2]
    assert res["timing"][0]["all_to_all_share"] == 0 and 0 < res["timing"][1]["all_to_all_share"] < 1
    assert "bytes/token dedup" in res["table"] and "all-to-all share" in res["table"]


def test_rank0_holds_the_run_lock_for_the_job(mini_cache, tmp_path):
    from engram.io import RunLock

    run = tmp_path / "run"
    with RunLock(run):  # another writer holds the run: the whole job is refused, no rank trains
        job = run_job("train", 2, tmp_path / "job", dict(train=tcfg(mini_cache), run_dir=str(run),
                                                          cache_dir=str(mini_cache), timeout=30))
    assert job.returncodes == [3, 3]
    assert "FAILED RunLockedError" in job.stderr[0] and "is in use by another engram process" in job.stderr[0]
    assert "FAILED CollectiveError: rank 1 of 2 on cpu: locking the run directory failed on another rank" in job.stderr[1]
    assert not (run / "checkpoints").exists()
