"""Engram for Hugging Face ``transformers`` causal LMs (extra ``engram[hf]``); see docs/hf.md.

    adapter = add_engram(model, tokenizer, layers=[1, 5], table_sizes=(200_003, 200_003), d_mem=512)
    opt = build_optimizer(model, lr=1e-4)              # or EngramTrainer(model=model, args=..., ...)
    save_adapter(model, "my-adapter")                  # the adapter alone
    load_adapter(fresh_model, tokenizer, "my-adapter") # refuses another base model or tokenizer

``EngramTrainer`` is imported on first use (``transformers.Trainer`` takes seconds to import).
"""

from typing import Any

from engram.hf.adapter import EngramAdapter, VocabularyMismatchError, add_engram, engram_adapter
from engram.hf.cache import EngramCache
from engram.hf.families import FAMILIES, UnsupportedModelError, supported_models
from engram.hf.identity import AdapterMismatchError
from engram.hf.saving import AdapterFileError, load_adapter, save_adapter
from engram.hf.train import SplitOptimizer, build_optimizer, freeze_backbone, set_engram_trainable

__all__ = [
    "FAMILIES",
    "AdapterFileError",
    "AdapterMismatchError",
    "EngramAdapter",
    "EngramCache",
    "EngramTrainer",
    "SplitOptimizer",
    "UnsupportedModelError",
    "VocabularyMismatchError",
    "add_engram",
    "build_optimizer",
    "engram_adapter",
    "freeze_backbone",
    "load_adapter",
    "save_adapter",
    "set_engram_trainable",
    "supported_models",
]


def __getattr__(name: str) -> Any:
    if name == "EngramTrainer":
        from engram.hf.trainer import EngramTrainer

        return EngramTrainer
    raise AttributeError(f"module 'engram.hf' has no attribute {name!r}")
