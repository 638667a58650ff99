"""Sampling and generation with incremental decoding (the model's ``forward_chunk`` / ``decode_step``).

``generate_batch`` decodes many prompts of different lengths together in ``batch_size`` slots (continuous
batching): a prompt is prefilled into a free slot in one chunk, every busy slot then advances one token
per step, and a row that finishes (end token or ``max_new_tokens``) frees its slot for the next waiting
prompt. Greedy output for a prompt is the same alone or in a batch, and equals the argmax of the full
forward at every step (tested, fp32). Sampling uses one generator per prompt (seeded ``seed + i``), so a
prompt's sample does not depend on its neighbours either. With a ``RowPrefetcher`` each chunk's Engram
rows are gathered in the background while the blocks before each Engram layer compute.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engram.data.bpe import eot_id
from engram.infer.prefetch import RowPrefetcher
from engram.infer.run import load_run
from engram.memory.placement import Placement
from engram.model import DecodeState, EngramLM


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # per prompt, in prompt order
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    steps: int = 0  # decode forwards
    prefetch: dict = field(default_factory=dict)

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / max(self.decode_s, 1e-9)


@torch.no_grad()
def generate(
    model: EngramLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """Sample continuations for prompts of different lengths (temperature 0 = greedy), all in one batch."""
    return generate_batch(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, seed).tokens


@torch.no_grad()
def generate_batch(
    model: EngramLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    prefetcher: RowPrefetcher | None = None,
) -> GenerationResult:
    """Decode ``prompts`` in ``batch_size`` slots (default: all at once); see the module docstring."""
    check_prompts(prompts, model.cfg.vocab_size)
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    P = max(len(p) for p in prompts)
    if P + max_new_tokens > model.cfg.max_seq_len:
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        raise ValueError(
            f"prompt {longest} has {P} tokens; with {max_new_tokens} new tokens that exceeds the model's context "
            f"of {model.cfg.max_seq_len} tokens"
        )
    if max_new_tokens == 0:
        return GenerationResult([[] for _ in prompts])
    run = _Decoding(model, prompts, max_new_tokens, min(batch_size or len(prompts), len(prompts)), prefetcher)
    base = seed if seed is not None else int.from_bytes(os.urandom(8), "little") % 2**62
    gens = [torch.Generator(device=run.dev).manual_seed(base + i) for i in range(len(prompts))]
    while run.refill():
        nxt = _sample_rows(run.last, run.busy(), temperature, top_k, top_p, gens, run.owner)
        run.advance(nxt, eos_id)
    run.result.prefetch = prefetcher.stats.as_dict() if prefetcher is not None else {}
    return run.result


class _Decoding:
    """The slots of one ``generate_batch`` call: which prompt each holds, the decode state, timings."""

    def __init__(self, model: EngramLM, prompts: list[list[int]], max_new: int, slots: int,
                 prefetcher: RowPrefetcher | None) -> None:
        self.model, self.prompts, self.max_new, self.prefetcher = model, prompts, max_new, prefetcher
        self.dev = model.tok_emb.weight.device
        self.state: DecodeState = model.new_decode_state(slots, max(len(p) for p in prompts) + max_new)
        self.owner = [-1] * slots  # prompt index per slot, -1 = free
        self.waiting = deque(range(len(prompts)))
        self.last = torch.zeros(slots, model.cfg.vocab_size, device=self.dev)  # next-token logits per slot
        self.result = GenerationResult([[] for _ in prompts])

    def busy(self) -> list[int]:
        return [s for s, i in enumerate(self.owner) if i >= 0]

    def refill(self) -> bool:
        """Prefill waiting prompts into free slots; False when nothing is left to decode."""
        new = []
        for s in range(len(self.owner)):
            if self.owner[s] < 0 and self.waiting:
                self.owner[s] = self.waiting.popleft()
                new.append(s)
        if new:
            self.state.reset_rows(new)
            S, T = len(self.owner), max(len(self.prompts[self.owner[s]]) for s in new)
            ids = torch.zeros(S, T, dtype=torch.int64, device=self.dev)
            lengths = torch.zeros(S, dtype=torch.int64, device=self.dev)
            for s in new:
                p = self.prompts[self.owner[s]]
                ids[s, : len(p)] = torch.tensor(p, dtype=torch.int64)
                lengths[s] = len(p)
            t0 = time.perf_counter()
            logits = self._forward(ids, lengths)
            rows = torch.tensor(new, device=self.dev)
            self.last[rows] = logits[rows, lengths[rows] - 1].float()
            self.result.prefill_s += time.perf_counter() - t0
            self.result.prefill_tokens += int(lengths.sum())
        return bool(self.busy())

    def advance(self, nxt: dict[int, int], eos_id: int | None) -> None:
        """Record each busy slot's token; finished rows free their slot; the rest take one decode step."""
        go = torch.zeros(len(self.owner), dtype=torch.bool)
        ids = torch.zeros(len(self.owner), dtype=torch.int64)
        for s, tok in nxt.items():
            out = self.result.tokens[self.owner[s]]
            out.append(tok)
            if tok == eos_id or len(out) == self.max_new:
                self.owner[s] = -1
            else:
                go[s], ids[s] = True, tok
        if go.any():
            t0 = time.perf_counter()
            self.last = self._forward(ids[:, None].to(self.dev), go.to(self.dev, torch.int64))[:, 0].float()
            self.result.decode_s += time.perf_counter() - t0
            self.result.decode_tokens += int(go.sum())
            self.result.steps += 1

    def _forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        model, state = self.model, self.state
        if self.prefetcher is None or model.hasher is None:
            return model.forward_chunk(ids, state, lengths)
        hash_ids = model.hasher.step(ids, state.hash_state, lengths, check=False)
        rows = self.prefetcher.submit(hash_ids)
        return model.forward_chunk(ids, state, lengths, hash_ids=hash_ids, memory_rows=rows)


def _sample_rows(logits_SV: torch.Tensor, slots: list[int], temperature: float, top_k, top_p,
                 gens: list[torch.Generator], owner: list[int]) -> dict[int, int]:
    """slot -> next token; greedy in one argmax, sampling row by row with each prompt's generator."""
    if temperature == 0:
        picks = logits_SV[slots].argmax(-1).tolist()
        return dict(zip(slots, picks))
    return {s: int(sample_next(logits_SV[s : s + 1], temperature, top_k, top_p, gens[owner[s]])[0]) for s in slots}


def generate_text(run, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int | None = 50,
                  top_p: float | None = None, seed: int | None = 0, placement: Placement | None = None) -> str:
    """Continue ``prompt`` with a trained run, its tables on ``placement``'s tier (default: in memory)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    lr = load_run(run, placement=placement)
    eot = eot_id(lr.tokenizer)
    ids = [eot] + lr.tokenizer.encode(prompt).ids  # the separator opens every training document
    out = generate(lr.model, [ids], max_new_tokens, temperature, top_k, top_p, eos_id=eot, seed=seed)[0]
    return prompt + lr.tokenizer.decode([t for t in out if t != eot])


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line of a UTF-8 text file; an empty file or an empty line is refused, naming it."""
    from engram.infer.evaluate import read_text_file

    lines = read_text_file(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last prompt, it does not start an empty one
    if not lines:
        raise ValueError(f"{path}: no prompts (the file is empty)")
    empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if empty:
        raise ValueError(f"{path}: line {empty[0]} is an empty prompt")
    return lines


def generate_texts(run, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.8,
                   top_k: int | None = 50, top_p: float | None = None, seed: int | None = 0, batch_size: int = 8,
                   placement: Placement | None = None, prefetch: bool = False) -> tuple[list[str], GenerationResult]:
    """Continue many prompts together (continuous batching in ``batch_size`` slots); returns the texts and
    the run's figures (prefill and decode tokens/s, prefetch stalls)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    lr = load_run(run, placement=placement)
    eot = eot_id(lr.tokenizer)
    ids = [[eot] + lr.tokenizer.encode(p).ids for p in prompts]
    pf = RowPrefetcher(lr.model) if prefetch else None
    try:
        res = generate_batch(lr.model, ids, max_new_tokens, temperature, top_k, top_p, eos_id=eot, seed=seed,
                             batch_size=batch_size, prefetcher=pf)
    finally:
        if pf is not None:
            pf.close()
    texts = [p + lr.tokenizer.decode([t for t in out if t != eot]) for p, out in zip(prompts, res.tokens)]
    return texts, res


def check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    """Prompts are non-empty lists of integer token ids inside the vocabulary (floats are refused, not truncated)."""
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {b} is empty")
        for t, tok in enumerate(p):
            if isinstance(tok, bool) or not isinstance(tok, (int, np.integer)):
                raise TypeError(f"prompt {b} position {t}: token ids must be integers, got {tok!r} ({type(tok).__name__})")
            if not 0 <= int(tok) < vocab_size:
                raise ValueError(f"prompt {b} position {t}: token id {tok} outside the vocabulary [0, {vocab_size})")


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings that would silently do something else than asked."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer (or None for no limit), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] (or None), got {top_p!r}")


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row [B] from fp32 logits: greedy at temperature 0, else top-k / nucleus sampling
    (settings as ``check_sampling`` accepts them)."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits = logits_BV / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        srt, idx = logits.sort(-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


__all__ = ["GenerationResult", "check_prompts", "check_sampling", "generate", "generate_batch", "generate_text",
           "generate_texts", "read_prompts_file", "sample_next"]
