"""Probe sets for the Engram-off ablation: next-token questions with one right answer token.

Factual probes (what the training data states, the paper's knowledge tasks in miniature), built from the
training split by a fixed procedure, never picked by hand:

1. Count every (context of c tokens, next token) pair inside the training documents (c = 3 default).
2. Keep a context when it occurs at least ``min_count`` times (20) and one next token follows it at least
   ``min_share`` (90%) of the time: a fixed phrase or an entity's continuation.
3. Drop it when the answer is predictable from the context's last token alone: that token is followed by
   the answer less than ``max_last_share`` (50%) of the time overall. What remains needs the longer
   context, which is what n-gram memory holds.
4. Keep answers and contexts that contain a letter (no whitespace or punctuation-only questions).
5. Order by frequency (most frequent first, ties by token ids), keep at most one probe per answer token
   (variety), stop at ``limit`` (200).
The prompt is the separator (which opens every training document) followed by the context.

In-context probes (the answer is in the prompt, the paper's reading-comprehension side), synthetic and
seeded. Words are the tokenizer's single tokens that decode to a space and 3+ lowercase ASCII letters.
- copy: k = 8 distinct random words, a newline, then the first j of them again (1 <= j < k); the answer
  is word j + 1. An induction-style lookup: only the prompt says which word comes next.
- key-value: 6 lines "<key>:<value>" of distinct random words, then one of the keys and ":"; the
  answer is that key's value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from engram.analysis.ngrams import corpus_ngram_keys
from engram.data import eot_id

_WORD = re.compile(r"^ [a-z]{3,}$")


@dataclass(frozen=True)
class Probe:
    kind: str  # "factual", "copy" or "key-value"
    prompt: tuple[int, ...]  # token ids, the separator first
    answer: int  # the one right next token
    text: str  # the prompt and answer as text, for reading the report
    support: int = 0  # factual: how often the context occurs in the training data


def factual_probes(dataset, tokenizer, context: int = 3, min_count: int = 20, min_share: float = 0.9,
                   max_last_share: float = 0.5, limit: int = 200) -> list[Probe]:
    """Factual probes from a tokenised training split (``TokenDataset``) by the procedure above."""
    if context < 1 or min_count < 1 or limit < 1 or not 0 < min_share <= 1 or not 0 < max_last_share <= 1:
        raise ValueError("factual_probes: context, min_count, limit must be >= 1; shares in (0, 1]")
    V = int(dataset.vocab_size)
    keys, _ = corpus_ngram_keys(dataset, context + 1)
    full_u, full_c = np.unique(keys, return_counts=True)  # sorted: grouped by context
    ctx_all, ans_all = full_u // V, full_u % V
    starts = np.flatnonzero(np.r_[True, ctx_all[1:] != ctx_all[:-1]])
    totals = np.add.reduceat(full_c, starts)
    best = np.lexsort((ans_all, -full_c, ctx_all))[starts]  # per context: most frequent answer, then lowest id
    ctx, ans, best_c = ctx_all[best], ans_all[best], full_c[best]
    keep = (totals >= min_count) & (best_c >= min_share * totals)

    bi_keys, _ = corpus_ngram_keys(dataset, 2)
    bi_u, bi_c = np.unique(bi_keys, return_counts=True)
    followed = np.bincount(bi_u // V, weights=bi_c, minlength=V)  # occurrences of each token with a successor
    last = ctx % V
    pair = bi_c[np.searchsorted(bi_u, last * V + ans)]  # every (last, answer) pair occurred: it is in bi_u
    keep &= pair < max_last_share * followed[last]

    cand = np.flatnonzero(keep)
    cand = cand[np.lexsort((ctx[cand], -totals[cand]))]
    eot = eot_id(tokenizer)
    probes: list[Probe] = []
    used: set[int] = set()
    for i in cand:
        a = int(ans[i])
        if a in used:
            continue
        ids = _unpack(int(ctx[i]), context, V)
        a_text, c_text = tokenizer.decode([a]), tokenizer.decode(ids)
        if not (_has_letter(a_text) and _has_letter(c_text)):
            continue
        used.add(a)
        probes.append(Probe("factual", (eot, *ids), a, f"{c_text}|{a_text}", int(totals[i])))
        if len(probes) == limit:
            break
    return probes


def _unpack(key: int, n: int, base: int) -> list[int]:
    out = []
    for _ in range(n):
        key, t = divmod(key, base)
        out.append(t)
    return out[::-1]


def _has_letter(s: str) -> bool:
    return any(ch.isalpha() for ch in s)


def word_tokens(tokenizer) -> list[int]:
    """Ids of single tokens that decode to a space and 3+ lowercase ASCII letters, ascending."""
    return sorted(i for i in range(tokenizer.get_vocab_size()) if _WORD.match(tokenizer.decode([i])))


def _single_token(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) != 1:
        raise ValueError(f"the in-context probes need {text!r} to be one token; this tokenizer gives {ids}")
    return ids[0]


def _words(tokenizer, need: int) -> np.ndarray:
    pool = np.array(word_tokens(tokenizer), dtype=np.int64)
    if len(pool) < need:
        raise ValueError(f"the tokenizer has {len(pool)} single-token words, the in-context probes need {need}")
    return pool


def copy_probes(tokenizer, n: int = 100, length: int = 8, seed: int = 0) -> list[Probe]:
    """Copying: words, newline, the same words again up to a point; the answer is the next word."""
    if length < 2 or n < 1:
        raise ValueError("copy_probes: length must be >= 2 and n >= 1")
    pool, rng = _words(tokenizer, length), np.random.default_rng(seed)
    eot, nl = eot_id(tokenizer), _single_token(tokenizer, "\n")
    out = []
    for _ in range(n):
        w = [int(x) for x in rng.choice(pool, length, replace=False)]
        j = int(rng.integers(1, length))
        prompt = (eot, *w, nl, *w[:j])
        out.append(Probe("copy", prompt, w[j], f"{tokenizer.decode(list(prompt[1:]))}|{tokenizer.decode([w[j]])}"))
    return out


def key_value_probes(tokenizer, n: int = 100, pairs: int = 6, seed: int = 0) -> list[Probe]:
    """Key-value lookup: lines "key:value", then a key and ":"; the answer is its value."""
    if pairs < 1 or n < 1:
        raise ValueError("key_value_probes: pairs and n must be >= 1")
    pool, rng = _words(tokenizer, 2 * pairs), np.random.default_rng(seed)
    eot, nl, colon = eot_id(tokenizer), _single_token(tokenizer, "\n"), _single_token(tokenizer, ":")
    out = []
    for _ in range(n):
        w = [int(x) for x in rng.choice(pool, 2 * pairs, replace=False)]
        keys, values = w[:pairs], w[pairs:]
        q = int(rng.integers(0, pairs))
        prompt = [eot]
        for k, v in zip(keys, values):
            prompt += [k, colon, v, nl]
        prompt += [keys[q], colon]
        out.append(Probe("key-value", tuple(prompt), values[q],
                         f"{tokenizer.decode(prompt[1:])}|{tokenizer.decode([values[q]])}"))
    return out


__all__ = ["Probe", "copy_probes", "factual_probes", "key_value_probes", "word_tokens"]
