"""Training a transformers model with Engram added: a plain loop (backbone frozen or not), HF Trainer with
LoRA through peft alongside, and which parameters each setting changes (bit-exact: untouched means equal).

Text is real (a stdlib module's source), tokenised with a small BPE trained on stdlib source; models are
tiny random Llamas.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers

from engram.hf import (
    SplitOptimizer,
    add_engram,
    build_optimizer,
    engram_adapter,
    freeze_backbone,
    set_engram_trainable,
)
from engram.tokenizer import CompressionMap

EOS = 0
SMALL = dict(heads=2, table_sizes=(1009, 1013), d_mem=32)


@pytest.fixture(scope="module")
def tok(stdlib_bpe):
    return stdlib_bpe


@pytest.fixture(scope="module")
def cmap(tok):
    return CompressionMap.build(tok)


@pytest.fixture(scope="module")
def batch(tok):
    """[4, 32] ids of real text (the json package's source) and the same as labels."""
    ids = torch.tensor(tok.encode(Path(json.__file__).read_text()).ids[: 4 * 32]).view(4, 32)
    return {"input_ids": ids, "labels": ids.clone()}


def llama(tok, cmap, layers=(0, 2)):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=EOS, eos_token_id=EOS,
    )
    model = transformers.LlamaForCausalLM(cfg)
    add_engram(model, tok, layers=layers, compression=cmap, **SMALL)
    return model


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def engram_names(model) -> set[str]:
    ids = {id(p) for p in engram_adapter(model).parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def run_loop(model, batch, steps, **opt_kw) -> list[float]:
    opt = build_optimizer(model, **opt_kw)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_frozen_backbone_trains_engram_only(tok, cmap, batch):
    model = llama(tok, cmap)
    n = freeze_backbone(model)
    adapter = engram_adapter(model)
    assert n == sum(p.numel() for p in adapter.parameters())
    opt = build_optimizer(model, lr=3e-3)
    assert opt.lrs()["engram_tables"] == 1.5e-2 and opt.lrs()["backbone_decay"] == 3e-3
    model(**batch).loss.backward()
    assert all(p.grad.is_sparse for p in adapter.table_parameters())  # only the rows the batch touched
    opt.zero_grad()
    before = snapshot(model)
    losses = run_loop(model, batch, 6, lr=3e-3)
    assert losses[-1] < losses[0]
    assert changed(model, before) == engram_names(model)  # every Engram tensor moved; nothing else did


def test_full_finetune_with_engram(tok, cmap, batch):
    model = llama(tok, cmap)
    before = snapshot(model)
    losses = run_loop(model, batch, 4, lr=3e-3, weight_decay=0.1)
    assert losses[-1] < losses[0]
    moved = changed(model, before)
    assert engram_names(model) <= moved and "model.layers.1.self_attn.q_proj.weight" in moved


def test_trainer_with_lora_and_engram(tok, cmap, batch, tmp_path):
    from engram.hf import EngramTrainer

    model = llama(tok, cmap)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       task_type="CAUSAL_LM"))
    set_engram_trainable(lora)  # get_peft_model froze everything but LoRA
    before = snapshot(lora)
    rows = [{"input_ids": batch["input_ids"][i], "labels": batch["labels"][i]} for i in range(4)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        max_grad_norm=1.0, lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True,
    )
    trainer = EngramTrainer(model=lora, args=args, train_dataset=rows)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, SplitOptimizer)  # accelerate wraps it
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups["engram_tables"] == pytest.approx(5 * groups["backbone_decay"])  # the schedule kept x5
    assert "grad_norm" in trainer.state.log_history[0]  # clipped with sparse table gradients
    lora_names = {n for n in before if "lora_" in n}
    assert lora_names and changed(lora, before) == lora_names | engram_names(lora)
    state = trainer.optimizer.state_dict()
    assert set(state["optimizers"]) == {"adamw", "tables"}


def test_lora_on_engram_projections_is_refused(tok, cmap, batch):
    model = llama(tok, cmap)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["value_proj"]))
    with pytest.raises(TypeError, match="value_proj of decoder layer 0 was replaced by Linear"):
        wrapped(**batch)


@pytest.mark.slow
def test_example_quick(mini_cache, tmp_path):
    """examples/hf_adapter.py --quick: pre-train a Llama on Shakespeare, fine-tune three ways on Python."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    cmd = [sys.executable, str(root / "examples" / "hf_adapter.py"), "--quick", "--out", str(out), "--cache-dir", str(mini_cache)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| LoRA + Engram" in proc.stdout  # the table
    result = json.loads((out / "results.json").read_text())
    arms = [r["arm"] for r in result["rows"]]
    assert arms == ["pre-trained, no fine-tuning", "LoRA", "Engram (backbone frozen)", "LoRA + Engram"]
    for r in result["rows"]:
        assert all(0 < r[k] < 10 for k in result["heldout"])
    lora, engram, both = result["rows"][1:]
    assert both["trainable"] == lora["trainable"] + engram["trainable"]
