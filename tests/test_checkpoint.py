"""Checkpoints (atomicity under SIGKILL and ENOSPC, refusal of foreign/corrupt checkpoints, bit-exact
resume), atomic file writes (engram.io) and metrics (JSONL, PNG loss curves).

Tiers: exact (resume losses bit-identical, bytes on disk), equivalence (killed writer vs previous state).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engram
from engram import io as eio
from engram.layers.norms import RMSNorm
from engram.memory.table import EngramTable
from engram import checkpoint as ckpt
from engram.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from engram.train.metrics import JsonlWriter, plot_loss_curves, read_jsonl
from engram.train.optim import SparseRowAdam, build_optimizers
from engram.train.schedule import WarmupStepDecay

CONFIG = {"model": {"d_model": 8, "table_sizes": [97, 101], "layers": [1]}, "train": {"lr": 1e-2, "seed": 0}}
FINGERPRINT = "hash-layout-v1:abc123"
TABLE_FILE = "table.table.rows-0-200.safetensors"  # StandIn's one table, saved as one row range


class StandIn(nn.Module):
    """Stand-in LM with a sparse "engram table", dropout (consumes torch RNG), optional tied head."""

    def __init__(self, vocab: int = 32, rows: int = 200, d: int = 8, tie: bool = False,
                 table_dtype: torch.dtype = torch.float32, extra_layer: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.table = EngramTable([rows // 2, rows - rows // 2], d, table_dtype, name="table")
        self.norm = RMSNorm(d)
        self.proj = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.tok.weight
        if extra_layer:
            self.extra = nn.Linear(d, d)
        self.register_buffer("expert_bias", torch.zeros(3))  # persistent buffer updated outside autograd
        self.fingerprint: str | None = FINGERPRINT

    def hash_fingerprint(self) -> str | None:  # what EngramLM reports for its hash layout
        return self.fingerprint

    def memory_tables(self) -> dict[str, EngramTable]:
        return {"table": self.table}

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # x (B, T), ids (B, T, H)
        h = self.tok(x) + self.table(ids).float().sum(-2)  # (B, T, D)
        h = h + F.dropout(self.proj(self.norm(h)), p=0.2, training=self.training)
        return self.lm_head(h)  # (B, T, V)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws from torch, numpy and python RNGs, so resume must restore all three."""
    x = torch.randint(0, 32, (3, 10))
    ids = torch.from_numpy(np.random.randint(0, 100, size=(3, 10, 2)))
    ids[0, random.randrange(10)] = step % 100
    return x, ids


def _train(model, opt, sched, start: int, stop: int, trainer: dict) -> list[float]:
    losses = []
    for step in range(start, stop):
        opt.set_lr_factor(sched(step))
        x, ids = _batch(step)
        opt.zero_grad()
        loss = F.cross_entropy(model(x, ids).flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.expert_bias.add_(0.01)
        trainer["tokens_seen"] += x.numel()
        trainer["loader"]["position"] += 1
        losses.append(loss.item())
    return losses


def _seed_all(seed: int) -> None:
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def _fresh(seed: int = 0, **kw):
    _seed_all(seed)
    model = StandIn(**kw)
    opt = build_optimizers(model, lr=1e-2, weight_decay=0.1)
    return model, opt


# --------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_exact(tmp_path, table_dtype):
    sched = WarmupStepDecay(total_steps=12, warmup_steps=3, milestones=(0.5,), factors=(0.3,))
    k, n = 5, 12
    model, opt = _fresh(0, table_dtype=table_dtype)
    trainer = {"tokens_seen": 0, "loader": {"position": 0}}
    losses = _train(model, opt, sched, 0, k, trainer)
    save_checkpoint(tmp_path, k, model, opt, CONFIG, trainer)
    reference = _train(model, opt, sched, k, n, trainer)

    model2, opt2 = _fresh(123, table_dtype=table_dtype)  # different init and RNG streams
    loaded = load_checkpoint(tmp_path, model2, opt2, CONFIG)
    assert loaded.step == k and loaded.trainer_state == {"tokens_seen": 3 * 10 * k, "loader": {"position": k}}
    assert opt2.optimizers["tables"].state[model2.table.weight]["exp_avg"].dtype == torch.float32
    resumed = _train(model2, opt2, sched, loaded.step, n, dict(loaded.trainer_state))
    assert resumed == reference  # bit-exact floats
    assert len(losses) == k
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_in_a_fresh_process_is_bit_exact(tmp_path):
    """Same as above, but the resumed run is a new interpreter (nothing shared but the directory)."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint import _fresh, _train, CONFIG, FINGERPRINT
        from engram.checkpoint import load_checkpoint, save_checkpoint
        from engram.train.schedule import WarmupCosine
        sched = WarmupCosine(total_steps=10, warmup_steps=2)
        if sys.argv[1] == "first":
            model, opt = _fresh(0)
            trainer = {{"tokens_seen": 0, "loader": {{"position": 0}}}}
            _train(model, opt, sched, 0, 4, trainer)
            save_checkpoint(sys.argv[2], 4, model, opt, CONFIG, trainer)
            print(json.dumps(_train(model, opt, sched, 4, 10, trainer)))
        else:
            model, opt = _fresh(99)
            loaded = load_checkpoint(sys.argv[2], model, opt, CONFIG)
            print(json.dumps(_train(model, opt, sched, loaded.step, 10, dict(loaded.trainer_state))))
    """)
    (tmp_path / "run.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(Path(engram.__file__).parent.parent)}
    outs = [
        subprocess.run([sys.executable, str(tmp_path / "run.py"), which, str(tmp_path / "ck")],
                       capture_output=True, text=True, env=env, timeout=120, check=True).stdout
        for which in ("first", "second")
    ]
    assert json.loads(outs[0]) == json.loads(outs[1])


# ------------------------------------------------------------------------------------ atomicity


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_checkpoint import _fresh, CONFIG
from engram.checkpoint import save_checkpoint
model, opt = _fresh(0)
save_checkpoint(sys.argv[1], 1, model, opt, CONFIG, {{"tokens_seen": 1}})
with __import__("torch").no_grad():
    model.proj.weight.add_(1.0)
save_checkpoint(sys.argv[1], 2, model, opt, CONFIG, {{"tokens_seen": 2}})
print("DONE2", flush=True)
"""


def test_sigkill_during_write_leaves_previous_checkpoint_loadable(tmp_path):
    """A real process killed (by the io fault hook, at a named point) half-way through its second save."""
    root = tmp_path / "ck"
    (tmp_path / "kill.py").write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": str(Path(engram.__file__).parent.parent),
           eio.FAULTS_ENV: f"checkpoint.file:{TABLE_FILE}=kill@2"}  # dies after the 2nd save's tables
    proc = subprocess.run([sys.executable, str(tmp_path / "kill.py"), str(root)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert "DONE2" not in proc.stdout
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(root) == root / "step_00000001"
    assert [d.name for d in list_checkpoints(root)] == ["step_00000001"]
    assert list(root.glob(".tmp-*"))  # the half-written one is still there ...
    model, opt = _fresh(5)
    loaded = load_checkpoint(root, model, opt, CONFIG)
    assert loaded.step == 1 and loaded.trainer_state == {"tokens_seen": 1}
    reference, _ = _fresh(0)
    assert torch.equal(model.proj.weight, reference.proj.weight)  # not the +1.0 of the killed save
    save_checkpoint(root, 3, model, opt, CONFIG)
    assert not list(root.glob(".tmp-*"))  # ... and the next save removes it (its writer is dead)


@pytest.mark.parametrize("failing", [ckpt.MODEL_FILE, TABLE_FILE, ckpt.OPTIM_FILE, ckpt.MANIFEST_FILE])
def test_disk_full_keeps_previous_checkpoint_and_raises_clearly(tmp_path, monkeypatch, failing):
    root = tmp_path / "ck"
    model, opt = _fresh(0)
    save_checkpoint(root, 1, model, opt, CONFIG, {"tokens_seen": 1})
    real = eio.write_synced

    def full_disk(path, data):
        if Path(path).name == failing:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(eio, "write_synced", full_disk)
    with torch.no_grad():
        model.proj.weight.add_(1.0)
    with pytest.raises(OSError) as info:
        save_checkpoint(root, 2, model, opt, CONFIG, {"tokens_seen": 2})
    assert info.value.errno == errno.ENOSPC
    assert failing in str(info.value) and "step_00000002" in str(info.value) and "untouched" in str(info.value)
    assert not list(root.glob(".tmp-*"))  # temp dir removed: its space is given back
    assert [d.name for d in list_checkpoints(root)] == ["step_00000001"]
    assert (root / "latest").read_text().strip() == "step_00000001"
    monkeypatch.undo()
    model2, opt2 = _fresh(7)
    assert load_checkpoint(root, model2, opt2, CONFIG).step == 1


def test_latest_pointer_missing_target_falls_back_and_keep_last_prunes(tmp_path):
    model, opt = _fresh(0)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, opt, CONFIG, keep_last=2)
    assert [d.name for d in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    (tmp_path / "latest").write_text("step_00000009\n")  # points at nothing (e.g. a crash mid-swap)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000004"
    with torch.no_grad():
        model.proj.weight.zero_()
    save_checkpoint(tmp_path, 4, model, opt, CONFIG, keep_last=2)  # re-saving a step replaces it
    fresh, _ = _fresh(3)
    load_checkpoint(tmp_path, fresh, None, CONFIG)
    assert torch.equal(fresh.proj.weight, torch.zeros_like(fresh.proj.weight))
    assert latest_checkpoint(tmp_path / "nothing-here") is None
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing-here", fresh, None, CONFIG)


# ------------------------------------------------------------------------------------ refusals


def test_refuses_other_config_listing_fields_and_other_fingerprint(tmp_path):
    model, opt = _fresh(0)
    save_checkpoint(tmp_path, 1, model, opt, CONFIG)
    other = json.loads(json.dumps(CONFIG))
    other["model"]["table_sizes"] = [97, 103]
    other["train"]["lr"] = 3e-3
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, model, opt, other)
    msg = str(info.value)
    assert "model.table_sizes" in msg and "train.lr" in msg and "seed" not in msg
    model.fingerprint = "other"  # the check is not optional: the model's own layout is always compared
    with pytest.raises(CheckpointError, match="another hash layout .fingerprint 'hash-layout-v1:abc123', the model's is 'other'"):
        load_checkpoint(tmp_path, model, opt, CONFIG)
    model.fingerprint = FINGERPRINT
    tuple_config = {"model": {**CONFIG["model"], "table_sizes": (97, 101), "layers": (1,)}, "train": CONFIG["train"]}
    load_checkpoint(tmp_path, model, opt, tuple_config)  # tuples and lists compare equal


def test_refuses_missing_unexpected_and_misshaped_keys(tmp_path):
    model, opt = _fresh(0)
    save_checkpoint(tmp_path, 1, model, opt, CONFIG)
    bigger, _ = _fresh(0, extra_layer=True)
    with pytest.raises(CheckpointError, match=r"missing keys \['extra.bias', 'extra.weight'\]"):
        load_checkpoint(tmp_path, bigger, None, CONFIG)
    save_checkpoint(tmp_path / "big", 1, bigger, None, CONFIG)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['extra.bias', 'extra.weight'\]"):
        load_checkpoint(tmp_path / "big", model, None, CONFIG)
    wide, _ = _fresh(0, rows=300)
    with pytest.raises(CheckpointError, match=r"another table layout .*head_sizes: \[100, 100\] != \[150, 150\]"):
        load_checkpoint(tmp_path, wide, None, CONFIG)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(tmp_path / "big", bigger, build_optimizers(bigger, lr=1e-3), CONFIG)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garble_header"])
def test_corrupt_or_truncated_files_are_named(tmp_path, damage):
    model, opt = _fresh(0)
    path = save_checkpoint(tmp_path, 1, model, opt, CONFIG)
    victim = path / TABLE_FILE
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[-5] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        data[:8] = (10**12).to_bytes(8, "little")  # header length far past the end of the file
        victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=TABLE_FILE):
        load_checkpoint(tmp_path, model, opt, CONFIG)
    if damage == "garble_header":  # without the checksum pass, safetensors itself rejects it, still named
        with pytest.raises(CheckpointError, match=f"{TABLE_FILE} is truncated or corrupt"):
            load_checkpoint(tmp_path, model, opt, CONFIG, verify=False)


def test_table_split_tied_weights_buffers_and_extra_files(tmp_path):
    model, opt = _fresh(0, tie=True)
    with torch.no_grad():
        model.expert_bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    src = tmp_path / "tokenizer.json"
    src.write_text('{"vocab": 32}')
    path = save_checkpoint(tmp_path / "ck", 7, model, opt, CONFIG, extra_files={
        "tokenizer.json": src, "compression_map.bin": b"\x00\x01", "hash_fingerprint.json": {"multipliers": [3, 5]},
    })
    import safetensors.torch as st

    rows = st.load_file(path / TABLE_FILE)
    assert set(rows) == {"weight"} and torch.equal(rows["weight"], model.table.weight)  # no step yet: no moments
    backbone = st.load_file(path / ckpt.MODEL_FILE)
    assert "table.weight" not in backbone and "expert_bias" in backbone
    assert ("tok.weight" in backbone) != ("lm_head.weight" in backbone)  # tied weight stored once
    fresh, _ = _fresh(4, tie=True)
    loaded = load_checkpoint(path, fresh, None, CONFIG)
    assert fresh.lm_head.weight is fresh.tok.weight and torch.equal(fresh.tok.weight, model.tok.weight)
    assert fresh.expert_bias.tolist() == [1.0, 2.0, 3.0]
    assert loaded.files["tokenizer.json"].read_text() == '{"vocab": 32}'
    assert loaded.files["compression_map.bin"].read_bytes() == b"\x00\x01"
    assert json.loads(loaded.files["hash_fingerprint.json"].read_text()) == {"multipliers": [3, 5]}
    with pytest.raises(ValueError, match="bad extra file name"):
        save_checkpoint(tmp_path / "ck", 8, model, opt, CONFIG, extra_files={"config.json": b"{}"})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "ck", 8, model, opt, CONFIG, trainer_state={"t": torch.zeros(1)})
    assert [d.name for d in list_checkpoints(tmp_path / "ck")] == ["step_00000007"]


# ---------------------------------------------------------------------------------------- io


def test_atomic_write_replaces_or_leaves_old_content(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    eio.atomic_write(target, "one\n")
    eio.atomic_write_json(tmp_path / "x.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2], "b": 1}

    def failing_writer(f):
        f.write(b"tw")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        eio.atomic_write(target, failing_writer)
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == "one\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "x.json"]  # no temp file left
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError):
        eio.atomic_write(target, b"two")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert target.read_text() == "one\n"
    eio.atomic_write(target, b"three")
    assert target.read_bytes() == b"three" and len(eio.sha256_file(target)) == 64


# ------------------------------------------------------------------------------------ metrics


def test_jsonl_writer_and_loss_curve_png(tmp_path):
    log = tmp_path / "a" / "metrics.jsonl"
    with JsonlWriter(log) as w:
        for step in range(5):
            w.write({"step": step, "tokens": 100 * step, "train_loss": 4.0 - 0.5 * step})
        w.write({"step": 4, "tokens": 400, "val_loss": 2.5})
    with open(log, "a") as f:
        f.write('{"step": 5, "tok')  # torn last line of a killed run
    records = read_jsonl(log)
    assert len(records) == 6 and records[-1]["val_loss"] == 2.5
    other = [{"tokens": t, "train_loss": 3.0, "val_loss": 3.1} for t in (0, 200, 400)]
    out = plot_loss_curves({"engram": log, "baseline": other}, tmp_path / "plots" / "loss.png", title="loss")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert data[12:16] == b"IHDR"


def test_disk_full_inside_torch_save_names_checkpoint_and_file(tmp_path):
    """A real torch.save hitting ENOSPC (injected at the io layer) reports the documented error, not
    torch's 'unexpected pos'; the previous checkpoint is untouched."""
    root = tmp_path / "ck"
    model, opt = _fresh(0)
    save_checkpoint(root, 1, model, opt, CONFIG)
    with eio.inject_faults(eio.Fault(f"write:{ckpt.OPTIM_FILE}", after_bytes=500)):
        with pytest.raises(OSError) as info:
            save_checkpoint(root, 2, model, opt, CONFIG)
    assert info.value.errno == errno.ENOSPC
    msg = str(info.value)
    assert "step_00000002" in msg and ckpt.OPTIM_FILE in msg and "unexpected pos" not in msg
    assert [d.name for d in list_checkpoints(root)] == ["step_00000001"] and not list(root.glob(".tmp-*"))


def test_manifest_file_names_must_be_plain(tmp_path):
    model, opt = _fresh(0)
    path = save_checkpoint(tmp_path, 1, model, opt, CONFIG)
    manifest = json.loads((path / ckpt.MANIFEST_FILE).read_text())
    for bad in ("../outside.json", "/etc/passwd"):
        m = json.loads(json.dumps(manifest))
        m["extra_files"] = [bad]
        (path / ckpt.MANIFEST_FILE).write_text(json.dumps(m))
        with pytest.raises(CheckpointError, match="plain names"):
            load_checkpoint(tmp_path, model, opt, CONFIG)


# ------------------------------------------------------------------------------------ old formats

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "run_v1"  # written by format 1 (tables.safetensors)


def test_a_format_1_checkpoint_still_loads_and_resaves_as_format_2(tmp_path):
    """A run saved before tables moved into row-range files: same logits, its optimizer state resumes, and
    saved again (format 2) it round-trips exactly."""
    from engram.infer import load_run
    from engram.train.optim import build_optimizers

    run = load_run(FIXTURE_V1)
    want = torch.load(FIXTURE_V1 / "expected_logits.pt", weights_only=True)
    assert torch.equal(run.model(want["ids"]).logits, want["logits"])
    model = run.model.train()
    opt = build_optimizers(model, lr=1e-3)
    load_checkpoint(run.checkpoint, model, opt, None, restore_rng=False)
    table = model.memory_tables()["engram.1"]
    state = opt.param_state(table.weight)
    assert state["step"] == 3 and state["exp_avg"].abs().sum() > 0  # the table's moments came along
    path = save_checkpoint(tmp_path, 3, model, opt, {})
    assert json.loads((path / ckpt.MANIFEST_FILE).read_text())["format_version"] == 2
    again, opt2 = load_run(FIXTURE_V1).model.train(), None
    opt2 = build_optimizers(again, lr=1e-3)
    load_checkpoint(path, again, opt2, None, restore_rng=False)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    for k, v in state.items():
        got = opt2.param_state(again.memory_tables()["engram.1"].weight)[k]
        assert torch.equal(got, v) if isinstance(v, torch.Tensor) else got == v, k
