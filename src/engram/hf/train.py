"""Training a model with Engram added: which parameters train, the optimizer split, and HF ``Trainer``.

The tables return sparse row gradients (only the rows a batch touched). ``torch.optim.AdamW`` and
``torch.nn.utils.clip_grad_norm_`` reject sparse gradients, so the paper's split is used instead
(``engram.train.optim``): the backbone's trainable parameters and Engram's gate / value / conv weights on
AdamW, the tables on ``SparseRowAdam`` at lr x ``table_lr_mult`` (5) without weight decay; clipping
is sparse-aware.

- A plain loop: ``opt = build_optimizer(model, lr)``; then ``loss.backward(); opt.clip_grad_norm_(1.0);
  opt.step(); opt.zero_grad()`` (``opt.set_lr_factor(f)`` for a schedule).
- HF ``Trainer``: use ``engram.hf.trainer.EngramTrainer`` (same arguments, plus ``table_lr_mult``). It builds that split as one
  ``torch.optim.Optimizer`` (``SplitOptimizer``, what the Trainer, accelerate and LR schedulers expect; a
  scheduler's factor reaches the table group too, so the x5 ratio holds) and clips with the sparse-aware
  norm. ``TrainingArguments.optim`` must stay AdamW.
- Which parameters train: everything by default; ``freeze_backbone(model)`` leaves only Engram; with
  LoRA, ``peft.get_peft_model`` freezes all but LoRA, then ``set_engram_trainable(model)`` turns Engram
  back on (LoRA must not target Engram's ``value_proj`` / ``key_proj``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from engram.hf.adapter import engram_adapter
from engram.train.optim import EngramOptimizer, build_optimizers


def set_engram_trainable(model: nn.Module, trainable: bool = True) -> int:
    """Set ``requires_grad`` on every Engram parameter (tables and fusion); returns how many elements."""
    params = engram_adapter(model).parameters()
    for p in params:
        p.requires_grad_(trainable)
    return sum(p.numel() for p in params)


def freeze_backbone(model: nn.Module) -> int:
    """Train Engram only: every other parameter gets ``requires_grad=False``; returns the trainable count."""
    engram = {id(p) for p in engram_adapter(model).parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in engram)
    return set_engram_trainable(model, True)


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    table_lr_mult: float = 5.0,
) -> EngramOptimizer:
    """AdamW for every trainable non-table parameter, ``SparseRowAdam`` at lr x ``table_lr_mult`` for the
    tables (raises if a trainable parameter would land in no group or in two)."""
    tables = engram_adapter(model).table_parameters()
    return build_optimizers(model, lr, weight_decay, betas, table_lr_mult, eps=eps, table_params=tables)


class SplitOptimizer(torch.optim.Optimizer):
    """An ``EngramOptimizer`` (AdamW + SparseRowAdam) as one ``torch.optim.Optimizer``.

    The param-group dicts are the members' own (shared, not copied), so whatever sets ``lr`` on a group
    (an LR scheduler) sets it for the member that steps it. State lives in the members; ``state_dict``
    and ``load_state_dict`` are theirs.
    """

    def __init__(self, inner: EngramOptimizer) -> None:
        self.inner = inner
        super().__init__(inner.param_groups, defaults={})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.inner.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)


__all__ = ["SplitOptimizer", "build_optimizer", "freeze_backbone", "set_engram_trainable"]
