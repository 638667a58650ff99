"""``EngramTrainer``: HF ``Trainer`` for a model with Engram (see ``engram.hf.train`` for the why).

Kept apart from ``engram.hf.train`` because importing ``transformers.Trainer`` pulls in accelerate and
takes seconds; nothing else in ``engram.hf`` needs it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from engram.hf.train import SplitOptimizer, build_optimizer
from engram.train.optim import clip_grad_norm_

_ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused")


class EngramTrainer(Trainer):
    """``transformers.Trainer`` for a model with Engram: the optimizer split above and sparse-aware clipping."""

    def __init__(self, *args: Any, table_lr_mult: float = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if str(getattr(self.args.optim, "value", self.args.optim)) not in _ADAMW_NAMES:
            raise ValueError(
                f"EngramTrainer trains dense parameters with AdamW and tables with SparseRowAdam; "
                f"TrainingArguments.optim={self.args.optim!r} would be ignored: leave it at its default"
            )
        self.table_lr_mult = table_lr_mult

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            a = self.args
            inner = build_optimizer(
                self.model if model is None else model, a.learning_rate, a.weight_decay,
                (a.adam_beta1, a.adam_beta2), a.adam_epsilon, self.table_lr_mult,
            )
            self.optimizer = SplitOptimizer(inner)
        return self.optimizer

    def _grads(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.grad is not None]

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        self.accelerator.unscale_gradients()
        return clip_grad_norm_(self._grads(model), self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: torch.Tensor | None = None) -> torch.Tensor:
        if grad_norm is None:
            self.accelerator.unscale_gradients()
            grad_norm = clip_grad_norm_(self._grads(model), math.inf)  # norm only: the factor is 1
        return grad_norm


__all__ = ["EngramTrainer"]
