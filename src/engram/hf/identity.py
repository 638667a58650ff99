"""The identity of a base model and tokenizer, recorded with an adapter and checked when it is loaded.

An adapter's tables are indexed by hashes of *this* tokenizer's canonical ids and its fusion reads
*this* model's hidden states, so it only means something on the same base. Identity is: the causal LM
class and model type, the architecture config (runtime switches such as dtype, attention kernel or
cache use removed; a sha256 of the rest), the embedding rows, and the tokenizer (vocabulary size, a
sha256 of its token -> id map, the compression map's fingerprint). Weights are not fingerprinted: a
fine-tune of the same base with the same config and tokenizer is accepted.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tokenizers import Tokenizer
from torch import nn

from engram.config import diff_configs
from engram.tokenizer import CompressionMap, tokenizer_identity

# Config entries that say how a model runs, not what it is; they may differ between save and load.
_RUNTIME_KEYS = frozenset(
    {
        "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache", "attn_implementation",
        "output_attentions", "output_hidden_states", "return_dict", "torchscript", "id2label", "label2id",
        "problem_type", "tokenizer_class", "prefix", "task_specific_params", "finetuning_task",
        "chunk_size_feed_forward", "pruned_heads",
    }
)


class AdapterMismatchError(ValueError):
    """An adapter saved for another base model or tokenizer; the message names every differing field."""


def architecture_config(config: Any) -> dict[str, Any]:
    """The model config as a JSON-ready dict without runtime switches and private (``_``) entries."""
    d = config.to_dict()
    return {k: v for k, v in sorted(d.items()) if k not in _RUNTIME_KEYS and not k.startswith("_")}


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def base_identity(model: nn.Module, tok: Tokenizer, cmap: CompressionMap) -> dict[str, Any]:
    """What an adapter records about the model and tokenizer it was made for."""
    arch = architecture_config(model.config)
    return {
        "class": type(model).__name__,
        "model_type": model.config.model_type,
        "config": arch,
        "config_sha256": _sha256_json(arch),
        "embedding_rows": int(model.get_input_embeddings().weight.shape[0]),
        "tokenizer": tokenizer_identity(tok, cmap),
    }


def _without_digest(identity: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in identity.items() if k != "config_sha256"}


def check_identity(saved: dict[str, Any], current: dict[str, Any], what: str) -> None:
    """Refuse ``what`` unless ``saved`` equals ``current``, naming each difference (saved != current)."""
    # the config digest only summarises "config", which is compared field by field
    diffs = diff_configs(_without_digest(saved), _without_digest(current))
    if diffs:
        shown = diffs[:12] + ([f"... and {len(diffs) - 12} more"] if len(diffs) > 12 else [])
        raise AdapterMismatchError(f"{what} was made for another base model or tokenizer: " + "; ".join(shown))


__all__ = ["AdapterMismatchError", "architecture_config", "base_identity", "check_identity", "tokenizer_identity"]
