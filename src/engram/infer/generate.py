"""Sampling and generation with incremental decoding (the model's ``forward_chunk`` / ``decode_step``).

Prompts of different lengths decode together: one prefill chunk with per-row lengths, then one token per
row per step; finished rows stop advancing. Greedy decoding equals the argmax of the full forward at every
step (tested).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from engram.data.bpe import eot_id
from engram.infer.run import load_run
from engram.memory.store import Placement
from engram.model import EngramLM


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
    """Sample continuations for prompts of different lengths (temperature 0 = greedy)."""
    check_prompts(prompts, model.cfg.vocab_size)
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    B, P = len(prompts), max(len(p) for p in prompts)
    if P + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"the longest prompt ({P} tokens) plus {max_new_tokens} new tokens exceeds the model's context of "
            f"{model.cfg.max_seq_len} tokens"
        )
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    dev = model.tok_emb.weight.device
    ids = torch.zeros(B, P, dtype=torch.int64, device=dev)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p, dtype=torch.int64)
    plen = torch.tensor([len(p) for p in prompts], device=dev)
    state = model.new_decode_state(B, P + max_new_tokens)
    logits = model.forward_chunk(ids, state, plen)
    last = logits[torch.arange(B, device=dev), plen - 1]  # [B, V] at each row's last prompt token
    gen = torch.Generator(device=dev)
    # a fresh seed from the OS when none is given: never reseed the global RNG as a side effect
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") % 2**63)
    out: list[list[int]] = [[] for _ in range(B)]
    active = torch.ones(B, dtype=torch.bool, device=dev)
    for _ in range(max_new_tokens):
        nxt = sample_next(last.float(), temperature, top_k, top_p, gen)
        for b in range(B):
            if active[b]:
                out[b].append(int(nxt[b]))
        if eos_id is not None:
            active &= nxt != eos_id
        if not bool(active.any()):
            break
        last = model.decode_step(nxt, state, active)
    return out


def generate_text(run, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int | None = 50,
                  top_p: float | None = None, seed: int | None = 0, placement: Placement | None = None) -> str:
    """Continue ``prompt`` with a trained run, its tables on ``placement``'s tier (default: in memory)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    lr = load_run(run, placement=placement)
    eot = eot_id(lr.tokenizer)
    ids = [eot] + lr.tokenizer.encode(prompt).ids  # the separator opens every training document
    out = generate(lr.model, [ids], max_new_tokens, temperature, top_k, top_p, eos_id=eot, seed=seed)[0]
    return prompt + lr.tokenizer.decode([t for t in out if t != eot])


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


__all__ = ["check_prompts", "check_sampling", "generate", "generate_text", "sample_next"]
