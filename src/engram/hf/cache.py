"""Engram's decoding state carried inside Hugging Face's KV cache, so ``generate`` keeps them together.

Incremental decoding needs, besides the KV cache, the last N - 1 canonical ids of every row (the n-gram
history) and, per Engram layer with a short conv, its last (kernel - 1) * dilation normalised inputs.
``EngramCache`` is HF's ``DynamicCache`` with that state attached: every batch operation ``generate``
applies to the cache (beam reordering, repeat for sampling several sequences, row selection, reset)
applies to the Engram state too, in the same call. Rolling back (``crop``, used by assisted decoding)
is refused: the state keeps only the tail it needs and cannot be rewound.

Shape legend: B rows (batch x beams), P = N - 1 history length, S conv history, C conv channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from engram.hashing import HashState
from engram.layers.engram import ConvState


@dataclass
class EngramDecodeState:
    """The n-gram history (int64 [B, P]) and each Engram layer's conv buffer ([B, S, C], by decoder index)."""

    hash_state: HashState
    conv: dict[int, ConvState] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.hash_state.history.shape[0])

    def select(self, rows_B: torch.Tensor) -> None:
        """Keep rows ``rows_B`` (any order, repeats allowed): beam reordering and row selection."""
        h = self.hash_state.history
        self.hash_state.history = h.index_select(0, rows_B.to(h.device))
        for st in self.conv.values():
            st.buffer = st.buffer.index_select(0, rows_B.to(st.buffer.device))

    def repeat_interleave(self, repeats: int) -> None:
        self.hash_state.history = self.hash_state.history.repeat_interleave(repeats, dim=0)
        for st in self.conv.values():
            st.buffer = st.buffer.repeat_interleave(repeats, dim=0)


class EngramCache(DynamicCache):
    """``DynamicCache`` plus ``engram_state`` (None until the first forward fills it)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.engram_state: EngramDecodeState | None = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.engram_state is not None:
            self.engram_state.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.engram_state is not None:
            self.engram_state.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.engram_state is not None:
            self.engram_state.repeat_interleave(repeats)

    def reset(self) -> None:
        super().reset()
        self.engram_state = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError(
                "an Engram cache cannot be rolled back: its n-gram history and conv state keep only the tail "
                "they need (assisted / speculative decoding is not supported with Engram)"
            )
        super().crop(tokens_to_remove)


__all__ = ["EngramCache", "EngramDecodeState"]
