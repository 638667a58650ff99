"""Slow, obviously correct reference implementations (plain loops over Python ints and tensors).

Not performance optimised on purpose: each mirrors SPEC.md step by step so the fast code in
``src/engram`` can be checked against it (integers exactly, floats within stated tolerances).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

INT64_MAX = 2**63 - 1


def ref_is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def ref_table_primes(layers, table_sizes, heads):
    used = set()
    out = {}
    for layer in layers:
        orders = []
        for size in table_sizes:
            cur = size - 1
            heads_p = []
            for _ in range(heads):
                cand = cur + 1
                while not (ref_is_prime(cand) and cand not in used):
                    cand += 1
                used.add(cand)
                heads_p.append(cand)
                cur = cand
            orders.append(heads_p)
        out[layer] = orders
    return out


def ref_multipliers(layer, seed, compressed_vocab, max_ngram):
    # The reference scheme draws from numpy's PCG64 generator; that RNG is part of the spec.
    half = max(1, (INT64_MAX // compressed_vocab) // 2)
    g = np.random.default_rng(seed + 10007 * layer)
    r = g.integers(low=0, high=half, size=(max_ngram,), dtype=np.int64)
    return [int(v) * 2 + 1 for v in r]


def ref_hash(ids, lookup, layers, max_ngram, heads, table_sizes, seed, pad_id, segments=None, token_mask=None):
    """ids: list of rows (lists of raw ids). Returns {layer: [[[index per head] per position] per row]}.

    token_mask: rows of bools, True = real token; a position reads token t-k only if none of t-k..t is
    masked (DeepSeek-V4.1's rule)."""
    lookup = [int(v) for v in lookup]
    vprime = max(lookup) + 1
    pad = lookup[pad_id]
    primes = ref_table_primes(layers, table_sizes, heads)
    out = {}
    for layer in layers:
        m = ref_multipliers(layer, seed, vprime, max_ngram)
        rows = []
        for b, row in enumerate(ids):
            comp = [lookup[t] for t in row]
            seg = segments[b] if segments is not None else [0] * len(row)
            real = token_mask[b] if token_mask is not None else [True] * len(row)
            pos_out = []
            for t in range(len(row)):
                # token t-k, or pad when before the sequence or in another (earlier) document
                def tok(k):
                    if t - k < 0:
                        return pad
                    if any(seg[t - j] != seg[t - j + 1] for j in range(1, k + 1)):
                        return pad
                    if not all(real[t - j] for j in range(k + 1)):
                        return pad
                    return comp[t - k]

                heads_out = []
                for n in range(2, max_ngram + 1):
                    mix = None
                    for k in range(n):
                        prod = tok(k) * m[k]
                        assert -(2**63) <= prod <= INT64_MAX  # the bound keeps products in int64
                        mix = prod if mix is None else mix ^ prod
                    for p in primes[layer][n - 2]:
                        heads_out.append(mix % p)
                pos_out.append(heads_out)
            rows.append(pos_out)
        out[layer] = rows
    return out


def ref_rmsnorm(x, weight, eps=1e-6):
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight.double()


def ref_fusion(h, e, value_w, key_w, q_w, k_w, conv_norm_w=None, conv_w=None, dilation=3, signed_sqrt=True, segments=None,
               *, value_b=None, key_b=None, gate_eps=1e-6, conv_eps=1e-6, use_gate=True, token_mask=None):
    """Per-branch loop of Engram fusion in float64.

    h [B, T, M, D], e [B, T, E], value_w [D, E], key_w [M*D, E], q_w/k_w [M, D],
    conv_norm_w [M, D], conv_w [M*D, K] (tap j reads j*dilation steps back); optional biases value_b [D],
    key_b [M*D]; use_gate=False fixes the gate at 1; token_mask [B, T] bool (True = real) zeroes the gate
    and the output at masked positions. Returns (Y, gate [B, T, M]).
    """
    h, e = h.double(), e.double()
    B, T, M, D = h.shape
    v = e @ value_w.double().T
    if value_b is not None:
        v = v + value_b.double()
    keep = token_mask.double() if token_mask is not None else torch.ones(B, T, dtype=torch.float64)
    gates, vts = [], []
    for m in range(M):
        if use_gate:
            k = e @ key_w.double()[m * D : (m + 1) * D].T
            if key_b is not None:
                k = k + key_b.double()[m * D : (m + 1) * D]
            s = (ref_rmsnorm(h[:, :, m], q_w[m], gate_eps) * ref_rmsnorm(k, k_w[m], gate_eps)).sum(-1) / math.sqrt(D)
            if signed_sqrt:
                s = torch.sign(s) * torch.sqrt(torch.clamp(s.abs(), min=1e-6))
            g = torch.sigmoid(s) * keep
        else:
            g = keep.clone()
        gates.append(g)
        vts.append(g.unsqueeze(-1) * v)
    vt = torch.stack(vts, 2)
    gate = torch.stack(gates, 2)
    if conv_w is None:
        return vt, gate
    K = conv_w.shape[1]
    z = torch.cat([ref_rmsnorm(vt[:, :, m], conv_norm_w[m], conv_eps) for m in range(M)], dim=-1)  # [B, T, C]
    y = torch.zeros_like(z)
    for b in range(B):
        for t in range(T):
            for j in range(K):
                src = t - j * dilation
                if src < 0:
                    continue
                if segments is not None and any(segments[b][u] != segments[b][t] for u in range(src, t + 1)):
                    continue
                y[b, t] += z[b, src] * conv_w[:, j].double()
    y = F.silu(y).reshape(B, T, M, D)
    return (vt + y) * keep[:, :, None, None], gate


# ----------------------------------------------------------------------------------------- analysis


def ref_hsic_unbiased(K, L):
    """Song et al. (2012)'s unbiased HSIC from two n x n kernel matrices, term by term with loops."""
    n = len(K)
    Kt = [[0.0 if i == j else float(K[i][j]) for j in range(n)] for i in range(n)]
    Lt = [[0.0 if i == j else float(L[i][j]) for j in range(n)] for i in range(n)]
    trace = sum(Kt[i][j] * Lt[j][i] for i in range(n) for j in range(n))
    sum_k = sum(Kt[i][j] for i in range(n) for j in range(n))
    sum_l = sum(Lt[i][j] for i in range(n) for j in range(n))
    k_row = [sum(Kt[i][j] for j in range(n)) for i in range(n)]  # K~ 1
    l_col = [sum(Lt[i][j] for i in range(n)) for j in range(n)]  # 1^T L~ (= L~ 1: symmetric)
    cross = sum(k_row[j] * l_col[j] for j in range(n))  # 1^T K~ L~ 1
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def ref_hsic_ustatistic(K, L):
    """The same estimator as a U-statistic over ordered quadruples of distinct indices (Song et al.,
    Theorem 2): (n)_4^-1 sum h(i, j, q, r), h = 1/24 sum over the 24 orderings of
    k_tu (l_tu + l_vw - 2 l_tv). O(n^4 * 24): tiny n only."""
    import itertools

    n = len(K)
    total = 0.0
    for quad in itertools.permutations(range(n), 4):
        h = 0.0
        for t, u, v, w in itertools.permutations(quad):
            h += K[t][u] * (L[t][u] + L[v][w] - 2 * L[t][v])
        total += h / 24
    count = n * (n - 1) * (n - 2) * (n - 3)
    return total / count


def ref_linear_cka(X, Y):
    """Linear CKA from explicit Gram matrices (float64) and ``ref_hsic_unbiased``."""
    X, Y = X.double(), Y.double()
    K, L = (X @ X.T).tolist(), (Y @ Y.T).tolist()
    return ref_hsic_unbiased(K, L) / math.sqrt(ref_hsic_unbiased(K, K) * ref_hsic_unbiased(L, L))


def ref_distinct_ngrams(docs, n, lookup=None):
    """Distinct n-grams (tuples of ids, mapped through lookup) inside documents, and their occurrences."""
    seen, total = set(), 0
    for doc in docs:
        d = [int(lookup[t]) if lookup is not None else int(t) for t in doc]
        for i in range(len(d) - n + 1):
            seen.add(tuple(d[i : i + n]))
            total += 1
    return len(seen), total


def ref_factual_contexts(docs, context, min_count, min_share, max_last_share):
    """The factual-probe selection before decoding filters: {context tuple: (answer, support)}, with plain
    dictionaries over every (context, next) pair inside documents."""
    from collections import Counter

    pairs, bigrams, followed = Counter(), Counter(), Counter()
    for doc in docs:
        d = [int(t) for t in doc]
        for i in range(len(d) - context):
            pairs[(tuple(d[i : i + context]), d[i + context])] += 1
        for i in range(len(d) - 1):
            bigrams[(d[i], d[i + 1])] += 1
            followed[d[i]] += 1
    by_ctx = {}
    for (ctx, a), c in pairs.items():
        by_ctx.setdefault(ctx, []).append((c, a))
    out = {}
    for ctx, lst in by_ctx.items():
        total = sum(c for c, _ in lst)
        best_c, best_a = max(lst, key=lambda ca: (ca[0], -ca[1]))  # most frequent, then lowest id
        if total < min_count or best_c < min_share * total:
            continue
        if bigrams[(ctx[-1], best_a)] >= max_last_share * followed[ctx[-1]]:
            continue
        out[ctx] = (best_a, total)
    return out
