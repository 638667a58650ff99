"""Looking inside a model without changing it: forward hooks on its public modules.

Nothing here adds an argument to ``forward``. Three context managers, each removing its hooks on exit:

- ``record_hidden(model)``: the residual streams after every block, reduced over streams the way the
  model's head reduces them (``reduce_streams``: the mean), so ``model.lm_head(model.norm(h))`` of the
  last block's entry is exactly the model's logits.
- ``record_gates(model)``: the gate alpha of every Engram layer (what ``return_gates=True`` returns).
- ``engram_off(model)``: every Engram layer's output Y replaced by zeros: the memory is switched off at
  inference while its gate is still computed (and still recorded).

They rely on two facts of the model's public modules: a block returns its streams first (alone or as
the first element of a tuple), and an Engram layer returns ``(Y, gate)``.

Shape legend: B batch, T time, M residual streams, D model width.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from engram.layers.hyper import reduce_streams


def _first(output) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first element of a returned tuple."""
    return output[0] if isinstance(output, tuple) else output


def engram_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Block index -> Engram layer, for every block that has one."""
    return {i: blk.engram for i, blk in enumerate(model.blocks) if getattr(blk, "engram", None) is not None}


@contextmanager
def record_hidden(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Yields a dict that fills, on each forward, with block index -> hidden state [B, T, D]
    (streams reduced by their mean, detached, in the dtype the block produced)."""
    hidden: dict[int, torch.Tensor] = {}

    def hook_for(i: int):
        def hook(_module, _inputs, output):
            hidden[i] = reduce_streams(_first(output)).detach()  # [B, T, M, D] -> [B, T, D]

        return hook

    handles = [blk.register_forward_hook(hook_for(i)) for i, blk in enumerate(model.blocks)]
    try:
        yield hidden
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_gates(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Yields a dict that fills, on each forward, with block index -> Engram gate [B, T, M] (fp32)."""
    gates: dict[int, torch.Tensor] = {}

    def hook_for(i: int):
        def hook(_module, _inputs, output):
            gates[i] = output[1].detach()

        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in engram_layers(model).items()]
    try:
        yield gates
    finally:
        for h in handles:
            h.remove()


@contextmanager
def engram_off(model: nn.Module) -> Iterator[None]:
    """Inside the block, every Engram layer adds nothing to the residual streams (Y = 0)."""
    layers = engram_layers(model)
    if not layers:
        raise ValueError("this model has no Engram layer: nothing to switch off")

    def hook(_module, _inputs, output):
        y, gate = output
        return torch.zeros_like(y), gate

    handles = [layer.register_forward_hook(hook) for layer in layers.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def project_to_vocab(model: nn.Module, hidden_BTD: torch.Tensor) -> torch.Tensor:
    """A hidden state read out as the model reads its last one: final norm, then the LM head."""
    return model.lm_head(model.norm(hidden_BTD))


__all__ = ["engram_layers", "engram_off", "project_to_vocab", "record_gates", "record_hidden"]
