"""N-gram hashing for Engram (SPEC section 2): multipliers, prime table sizes and hash indices.

Bit-compatible with the public reference scheme, so tables trained there load here and vice versa:

1. raw ids are mapped to canonical ids by the tokenizer compression map (``lookup``);
2. per Engram layer L, odd multipliers m = 2 r + 1 with r drawn by ``numpy.random.default_rng(seed +
   10007 L).integers(0, half_bound, N, int64)``, half_bound = max(1, (int64_max // V') // 2), which keeps
   every product x' * m inside int64;
3. mix_2 = x'_t m_0 XOR x'_{t-1} m_1, mix_n = mix_{n-1} XOR x'_{t-n+1} m_{n-1};
4. head k of order n reads index mix_n mod p_{L,n,k}, each p a distinct prime (one global set over all
   layers, orders and heads, searched upward from table_sizes[n] - 1).

Hashing is a pure function of token ids. It runs vectorised in torch on the ids' own device, for all
Engram layers in one call, outside the model's ``forward``: the model consumes hash ids. NumPy is used only
once at construction, to draw the multipliers exactly as the reference does. All arithmetic is int64.

Shape legend:
    B batch, T time, L Engram layers, N max n-gram order, P = N - 1 history length,
    O = N - 1 orders (2..N), K heads per order, H = O * K heads per layer, X = P + T (history, then chunk).
Output hash ids: int64 [B, T, L, H], head axis order-major (all heads of order 2, then order 3, ...),
each an index inside that head's own table (the table adds per-head offsets).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

INT64_MAX = int(np.iinfo(np.int64).max)
LAYER_SEED_PRIME = 10007  # the reference's per-layer seed stride

# Deterministic Miller-Rabin: these bases decide primality for every n < 3.3e24, which covers int64.
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    """Deterministic primality test for 0 <= n < 2**64 (Miller-Rabin with fixed bases)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x == 1 or x == n - 1:
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(start: int, used: set[int] | frozenset[int] = frozenset()) -> int:
    """The smallest prime strictly greater than ``start`` that is not in ``used``."""
    c = start + 1
    if c <= 2:
        c = 2
    while not (is_prime(c) and c not in used):
        c += 1 if c == 2 else (2 if c % 2 else 1)  # after 2, visit odd candidates only
    return c


def table_primes(
    layers: Sequence[int], table_sizes: Sequence[int], heads: int
) -> dict[int, tuple[tuple[int, ...], ...]]:
    """Prime size of every (layer, order, head) table: {layer: ((p per head) per order 2..N)}.

    One global set of used primes; per layer in order, per order, per head: the smallest unused prime
    greater than the previous head's prime, starting from table_sizes[order] - 1. All sizes differ.
    """
    used: set[int] = set()
    out: dict[int, tuple[tuple[int, ...], ...]] = {}
    for layer in layers:
        per_order = []
        for size in table_sizes:
            if size <= 0:
                raise ValueError(f"table sizes must be positive, got {size}")
            start, primes = size - 1, []
            for _ in range(heads):
                p = next_prime(start, used)
                used.add(p)
                primes.append(p)
                start = p
            per_order.append(tuple(primes))
        out[int(layer)] = tuple(per_order)
    return out


def layer_multipliers(layer: int, seed: int, compressed_vocab_size: int, max_ngram: int) -> tuple[int, ...]:
    """The N odd int64 multipliers of one Engram layer, drawn exactly as the reference draws them."""
    if compressed_vocab_size < 1:
        raise ValueError(f"compressed vocab size must be >= 1, got {compressed_vocab_size}")
    half_bound = max(1, (INT64_MAX // compressed_vocab_size) // 2)
    rng = np.random.default_rng(int(seed + LAYER_SEED_PRIME * int(layer)))
    r = rng.integers(0, half_bound, size=(max_ngram,), dtype=np.int64)
    return tuple(int(v) * 2 + 1 for v in r)


def segment_ids_from_starts(starts: Sequence[Sequence[int]], seq_len: int) -> torch.Tensor:
    """Segment ids [B, T] from per-row document start offsets (a row's first start may be omitted)."""
    seg = torch.zeros(len(starts), seq_len, dtype=torch.int64)
    for b, row in enumerate(starts):
        for s in row:
            if not 0 <= s < seq_len:
                raise ValueError(f"document start {s} out of range [0, {seq_len}) in row {b}")
            if s > 0:
                seg[b, s:] += 1
    return seg


@dataclass
class HashState:
    """Incremental hashing state: the last P = N - 1 canonical ids of each sequence (oldest first)."""

    history: torch.Tensor  # int64 [B, P]


def _check_ids(ids: torch.Tensor, vocab_size: int, name: str = "token ids") -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)  # one pass; locate the culprit only on failure
    if int(lo) < 0 or int(hi) >= vocab_size:
        bad = (ids < 0) | (ids >= vocab_size)
        pos = tuple(int(i) for i in bad.nonzero()[0].tolist())
        val = int(ids[pos])
        raise ValueError(f"{name}: id {val} at position {pos} is outside the vocabulary [0, {vocab_size})")


def _masked_positions(token_mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor | None:
    """[B, T] bool, True where ``token_mask`` masks a token (the mask says True = real token)."""
    if token_mask is None:
        return None
    if not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool:
        got = token_mask.dtype if isinstance(token_mask, torch.Tensor) else type(token_mask).__name__
        raise TypeError(f"token_mask must be a bool tensor (True = real token), got {got}")
    if token_mask.shape != ids.shape:
        raise ValueError(f"token_mask shape {tuple(token_mask.shape)} != ids shape {tuple(ids.shape)}")
    return ~token_mask.to(ids.device)


def _shift_right(x_BT: torch.Tensor, k: int) -> torch.Tensor:
    """x at t - k, False before position 0 (bool [B, T])."""
    if k == 0:
        return x_BT
    return torch.nn.functional.pad(x_BT[:, : max(x_BT.shape[1] - k, 0)], (min(k, x_BT.shape[1]), 0))


def _read_pad(
    N: int, segment_ids: torch.Tensor | None, masked_BT: torch.Tensor | None, device: torch.device
) -> list[torch.Tensor]:
    """For k = 0..N-1, bool [B, T]: position t reads the pad id in place of token t - k.

    Documents: t - k is read only if no document opens at t - k + 1, ..., t.
    Token mask (DeepSeek-V4.1's rule; its masked and incremental outputs match): t - k is read only if
    none of t - k, ..., t is masked. So a masked position hashes as an all-pad n-gram (its own token reads as
    pad too), and look-back never crosses a masked token: the first real token after a masked span sees
    pad history, as at the start of a sequence. Tokens before the chunk (the history) are already
    cleared by ``step``.
    """
    ref = segment_ids if segment_ids is not None else masked_BT
    pad_BT = torch.zeros(ref.shape, dtype=torch.bool, device=device)
    opens_BT = None
    if segment_ids is not None:
        seg = segment_ids.to(device)
        opens_BT = torch.zeros_like(pad_BT)
        opens_BT[:, 1:] = seg[:, 1:] != seg[:, :-1]  # position t opens a new document
    out = []
    for k in range(N):
        if masked_BT is not None:
            pad_BT = pad_BT | _shift_right(masked_BT, k)
        if opens_BT is not None and k >= 1:
            pad_BT = pad_BT | _shift_right(opens_BT, k - 1)
        out.append(pad_BT)
    return out


class NgramHasher:
    """Maps raw token ids to Engram hash ids for every Engram layer at once.

    Holds only immutable constants (the compression lookup, multipliers, prime moduli); calls are pure.
    Constants are copied to the ids' device on first use there.
    """

    def __init__(
        self,
        lookup: np.ndarray | torch.Tensor,
        layers: Sequence[int],
        max_ngram: int,
        heads: int,
        table_sizes: Sequence[int],
        seed: int = 0,
        pad_id: int = 2,
    ) -> None:
        lk = lookup.to("cpu") if isinstance(lookup, torch.Tensor) else torch.tensor(np.asarray(lookup), device="cpu")
        if lk.dim() != 1 or lk.numel() == 0 or lk.is_floating_point():
            raise ValueError("lookup must be a non-empty 1-D integer map raw id -> canonical id")
        self.lookup = lk.to(torch.int64).cpu().contiguous()
        self.vocab_size = int(self.lookup.numel())
        self.compressed_vocab_size = int(self.lookup.max()) + 1
        if int(self.lookup.min()) < 0:
            raise ValueError("lookup must map into non-negative canonical ids")
        if max_ngram < 2:
            raise ValueError(f"max_ngram must be >= 2, got {max_ngram}")
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        if len(table_sizes) != max_ngram - 1:
            raise ValueError(f"need one table size per order 2..{max_ngram}, got {list(table_sizes)}")
        if not 0 <= pad_id < self.vocab_size:
            raise ValueError(f"pad_id {pad_id} outside the vocabulary [0, {self.vocab_size})")
        self.layers = tuple(int(x) for x in layers)
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be non-empty and distinct, got {self.layers}")
        self.max_ngram, self.heads, self.seed = int(max_ngram), int(heads), int(seed)
        self.table_sizes_requested = tuple(int(s) for s in table_sizes)
        self.raw_pad_id = int(pad_id)
        self.pad_id = int(self.lookup[pad_id])  # canonical pad, as the reference maps it
        self.multipliers = {
            layer: layer_multipliers(layer, self.seed, self.compressed_vocab_size, self.max_ngram) for layer in self.layers
        }
        self.primes = table_primes(self.layers, self.table_sizes_requested, self.heads)
        self._consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, cfg: Any, lookup: np.ndarray | torch.Tensor) -> "NgramHasher":
        """Build from an ``EngramConfig`` (or ``OverEncodingConfig``) and a compression lookup."""
        layers = getattr(cfg, "layers", (0,))
        return cls(lookup, layers, cfg.max_ngram, cfg.heads, cfg.table_sizes, cfg.seed, cfg.pad_id)

    # ------------------------------------------------------------------------------------ layout

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def heads_per_layer(self) -> int:
        return (self.max_ngram - 1) * self.heads

    def head_sizes(self, layer: int) -> list[int]:
        """Prime size of each head of ``layer``, order-major (the flat table's layout)."""
        return [p for order in self.primes[layer] for p in order]

    def total_rows(self, layer: int) -> int:
        return sum(self.head_sizes(layer))

    def layout(self) -> dict[str, Any]:
        """Everything that determines hash ids; stored with tables and compared on load."""
        return {
            "format": "engram-hash-v1",
            "vocab_size": self.vocab_size,
            "compressed_vocab_size": self.compressed_vocab_size,
            "lookup_sha256": hashlib.sha256(self.lookup.numpy().astype("<i8").tobytes()).hexdigest(),
            "layers": list(self.layers),
            "max_ngram": self.max_ngram,
            "heads": self.heads,
            "seed": self.seed,
            "pad_id": self.raw_pad_id,
            "multipliers": {str(k): list(v) for k, v in self.multipliers.items()},
            "primes": {str(k): [list(o) for o in v] for k, v in self.primes.items()},
        }

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of ``layout()``."""
        return hashlib.sha256(json.dumps(self.layout(), sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------------------------------ hashing

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._consts:
            mult_LN = torch.tensor([self.multipliers[layer] for layer in self.layers], dtype=torch.int64, device="cpu")
            mod_LOK = torch.tensor([self.primes[layer] for layer in self.layers], dtype=torch.int64, device="cpu")
            self._consts[device] = (self.lookup.to(device), mult_LN.to(device), mod_LOK.to(device))
        return self._consts[device]

    def compress(self, ids: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Raw ids [*] -> canonical ids [*] int64 on the same device."""
        if check:
            _check_ids(ids, self.vocab_size)
        lookup = self._constants(ids.device)[0]
        return lookup[ids.long()]

    def __call__(
        self,
        ids: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        check: bool = True,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hash ids [B, T, L, H] for raw ids [B, T].

        n-grams never cross a change of ``segment_ids`` [B, T]. ``token_mask`` [B, T] bool marks real tokens
        (True) and masked ones (False: image tokens, left padding); see ``_read_pad`` for what a masked
        token does to the n-grams around it.
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must be [B, T], got shape {tuple(ids.shape)}")
        if segment_ids is not None and segment_ids.shape != ids.shape:
            raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} != ids shape {tuple(ids.shape)}")
        masked_BT = _masked_positions(token_mask, ids)
        x_BT = self.compress(ids, check)
        history_BP = torch.full((ids.shape[0], self.max_ngram - 1), self.pad_id, dtype=torch.int64, device=ids.device)
        return self._hash(x_BT, history_BP, segment_ids, masked_BT)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> HashState:
        """A fresh incremental state: every sequence starts with pad history, as at sequence start."""
        return HashState(
            torch.full((batch_size, self.max_ngram - 1), self.pad_id, dtype=torch.int64, device=device)
        )

    def step(
        self,
        ids: torch.Tensor,
        state: HashState,
        lengths: torch.Tensor | None = None,
        check: bool = True,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hash a new chunk [B, T] continuing each sequence's history; updates ``state`` in place.

        ``lengths`` [B] (default all T) is how many leading tokens of each row are real; only those
        advance that row's history, so rows of different lengths decode together (length 0 = inactive).
        Hash ids at padded positions are computed but meaningless. ``token_mask`` [B, T] (True = real
        token) masks as in ``__call__``; a masked token also clears the history it leaves behind, so chunked
        decoding gives the ids of one full call.
        """
        if ids.dim() != 2 or state.history.shape[0] != ids.shape[0]:
            raise ValueError(f"ids must be [B, T] with B = {state.history.shape[0]}, got {tuple(ids.shape)}")
        masked_BT = _masked_positions(token_mask, ids)
        x_BT = self.compress(ids, check)
        out = self._hash(x_BT, state.history, None, masked_BT)
        B, T = ids.shape
        P = self.max_ngram - 1
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int64, device=ids.device)
        lengths = lengths.to(device=ids.device, dtype=torch.int64)
        if lengths.shape != (B,) or bool(((lengths < 0) | (lengths > T)).any()):
            raise ValueError(f"lengths must be [B] = [{B}] values in [0, {T}], got {lengths.tolist()}")
        ext_BX = torch.cat([state.history, x_BT], dim=1)  # [B, P + T]
        if masked_BT is not None:  # what the next token sees: a masked token and all before it read as pad
            real_BT = torch.arange(T, device=ids.device)[None, :] < lengths[:, None]
            masked_BT = masked_BT & real_BT
            later_BT = masked_BT.flip(1).cumsum(1).flip(1) > 0  # a real masked token at or after t
            later_BX = torch.cat([later_BT[:, :1].expand(B, P), later_BT], dim=1)
            ext_BX = torch.where(later_BX, self.pad_id, ext_BX)
        idx_BP = lengths[:, None] + torch.arange(P, device=ids.device)[None, :]  # the last P real ids
        state.history = ext_BX.gather(1, idx_BP)
        return out

    def _hash(
        self,
        x_BT: torch.Tensor,
        history_BP: torch.Tensor,
        segment_ids: torch.Tensor | None,
        masked_BT: torch.Tensor | None,
    ) -> torch.Tensor:
        _, mult_LN, mod_LOK = self._constants(x_BT.device)
        B, T = x_BT.shape
        N, P = self.max_ngram, self.max_ngram - 1
        ext_BX = torch.cat([history_BP, x_BT], dim=1)  # [B, P + T]; history precedes position 0
        shifted = [ext_BX[:, P - k : P - k + T] for k in range(N)]  # token at t - k, [B, T] each
        if segment_ids is not None or masked_BT is not None:
            pad_NBT = _read_pad(N, segment_ids, masked_BT, x_BT.device)
            shifted = [torch.where(pad_BT, self.pad_id, tok_BT) for pad_BT, tok_BT in zip(pad_NBT, shifted)]
        # Layouts chosen by measurement on CPU: int64 products and XORs with time innermost (vectorised),
        # then the dividend materialised as [B, T, L, O, K] so the int64 fmod (the dominant cost) runs as
        # a plain same-shape loop: ~1.7x faster than a broadcasting fmod over a permuted view.
        tok_NBT = torch.stack(shifted, 0)  # [N, B, T]
        prod_LNBT = tok_NBT.unsqueeze(0) * mult_LN[:, :, None, None]  # fits int64 by the bound on m
        mix = prod_LNBT[:, 0]
        mixes = []
        for n in range(1, N):
            mix = torch.bitwise_xor(mix, prod_LNBT[:, n])  # [L, B, T] = mix of order n + 1
            mixes.append(mix)
        mix_BTLO = torch.stack(mixes, dim=-1).permute(1, 2, 0, 3)  # [B, T, L, O] (a view)
        K = self.heads
        dividend = mix_BTLO.unsqueeze(-1).expand(B, T, mix_BTLO.shape[2], N - 1, K).contiguous()
        # mix >= 0 (canonical ids >= 0, odd m > 0, XOR of non-negatives), so fmod equals the reference's
        # floor mod here, and is faster
        idx_BTLOK = torch.fmod(dividend, mod_LOK)
        return idx_BTLOK.reshape(B, T, len(self.layers), self.heads_per_layer)


__all__ = [
    "INT64_MAX",
    "HashState",
    "NgramHasher",
    "is_prime",
    "layer_multipliers",
    "next_prime",
    "segment_ids_from_starts",
    "table_primes",
]
