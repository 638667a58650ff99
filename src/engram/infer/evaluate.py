"""Evaluation: mean next-token loss and perplexity of a model over held-out batches, and of a trained run
on a corpus's held-out split or on a text file."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from engram.data.bpe import eot_id
from engram.data.corpora import Document, default_cache_dir, prepare
from engram.data.loader import Batch, EvalLoader
from engram.data.shards import TokenDataset, prepare_tokens, tokenize_documents, write_token_dataset
from engram.infer.run import load_run
from engram.memory.placement import Placement
from engram.model import EngramLM
from engram.runtime import autocast, compile_blocks


@torch.no_grad()
def evaluate(model: EngramLM, loader: Iterable[Batch], dtype: str = "auto",
             sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Mean next-token loss (nats) over the loader's tokens, and perplexity. Batches without any target
    (all masked) contribute nothing and are counted in ``empty_batches``.

    ``sum_over_ranks`` (a distributed run, each rank evaluating its part of every batch) sums the totals
    over ranks; every rank then runs every batch, even one without targets, since a forward through
    sharded tables is a collective."""
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    total, n, empty, batches = 0.0, 0, 0, 0
    for batch in loader:
        batches += 1
        k = int((batch.targets != -100).sum())
        if k == 0:
            empty += 1
            if sum_over_ranks is None:
                continue
        batch = batch.to(device)
        with autocast(dtype, device):
            out = model(batch.ids, batch.segment_ids, batch.hash_ids, batch.targets, return_logits=False)
        total += float(out.ce_loss) * k
        n += k
    model.train(was_training)
    if sum_over_ranks is not None:
        sums = sum_over_ranks(torch.tensor([total, n, empty], dtype=torch.float64, device=device)).tolist()
        total, n, empty = sums[0], int(sums[1]), int(sums[2])
    if n == 0:
        raise ValueError(f"nothing to evaluate: all {batches} batches have only masked targets")
    loss = total / n
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n, "empty_batches": empty}


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of ``path``; a binary file (NUL bytes or invalid UTF-8) is refused, not scored."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p} is a directory, expected a text file")
    data = p.read_bytes()
    if b"\0" in data[: 1 << 20]:
        raise ValueError(f"{p} looks binary (it contains NUL bytes); evaluation needs a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not UTF-8 text (invalid byte at offset {e.start}); evaluation needs a UTF-8 text file") from None


def evaluate_run(run: str | Path, corpus: str | None = None, file: str | Path | None = None, batches: int | None = 32,
                 batch_size: int = 8, seq_len: int | None = None, cache_dir: str | Path | None = None,
                 placement: Placement | None = None, compile: bool = False) -> dict[str, Any]:
    """Loss and perplexity of a trained run on a corpus's held-out split or on a text file, its tables on
    ``placement``'s tier (default: in memory); ``compile``: torch.compile each block first."""
    if (corpus is None) == (file is None):
        raise ValueError("give exactly one of --corpus NAME or --file PATH")
    if batches is not None and batches < 1:
        raise ValueError(f"the number of batches must be >= 1, got {batches}")
    for name, v in (("batch size", batch_size), ("sequence length", seq_len)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    text = read_text_file(file) if file is not None else None
    lr = load_run(run, placement=placement)
    T = seq_len or lr.config["train"]["seq_len"]
    if compile:
        compile_blocks(lr.model)
    if T > lr.model.cfg.max_seq_len:
        raise ValueError(f"sequence length {T} exceeds the model's context of {lr.model.cfg.max_seq_len} tokens")
    hash_fn = lr.model.hash if lr.model.hasher is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        if text is not None:
            docs = [Document(text=text, source="file", path=str(file))]
            write_token_dataset(tokenize_documents(docs, lr.tokenizer), tmp, vocab_size=lr.tokenizer.get_vocab_size(),
                                eot_id=eot_id(lr.tokenizer))
            data, source = TokenDataset(tmp), str(file)
        else:
            c = prepare(corpus, Path(cache_dir) if cache_dir else default_cache_dir())
            split = "val" if c.documents_of("val") else "train"
            data, source = prepare_tokens(c, lr.tokenizer, cache_dir, (split,))[split], f"{corpus} ({split})"
        loader = EvalLoader(data, batch_size, T, batches, hash_fn=hash_fn, source=source)
        res = evaluate(lr.model, loader, lr.config["train"]["dtype"])
    return {"run": str(run), "step": lr.step, "source": source, **res}
