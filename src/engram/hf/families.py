"""Which ``transformers`` causal LMs the adapter knows, and where their decoder layers live.

A family is recognised by ``config.model_type`` (never by a width or a parameter count). Inserting
Engram needs only two facts per family: the attribute of the causal LM that holds the decoder stack
(the module that receives ``input_ids`` and the cache) and the attribute of the stack that holds the
decoder layers, each called with the residual stream as its first argument. Adding a family with that
shape is one entry here plus a test in tests/test_hf.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True, slots=True)
class Family:
    """Where one family keeps its decoder stack and layers; ``causal_lm`` names the class for messages."""

    model_type: str
    causal_lm: str
    stack_attr: str  # causal LM -> decoder stack (receives input_ids, attention_mask, cache)
    layers_attr: str  # decoder stack -> nn.ModuleList of decoder layers


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", "model", "layers"),
        Family("mistral", "MistralForCausalLM", "model", "layers"),
        Family("qwen2", "Qwen2ForCausalLM", "model", "layers"),
        Family("qwen3", "Qwen3ForCausalLM", "model", "layers"),
        Family("gpt2", "GPT2LMHeadModel", "transformer", "h"),
    )
}


class UnsupportedModelError(TypeError):
    """The adapter does not know this model class."""


def supported_models() -> str:
    """``"gpt2 (GPT2LMHeadModel), llama (LlamaForCausalLM), ..."`` for error messages and docs."""
    return ", ".join(f"{f.model_type} ({f.causal_lm})" for f in sorted(FAMILIES.values(), key=lambda f: f.model_type))


def family_of(model: nn.Module) -> Family:
    """The family of a causal LM (or of its bare decoder stack), or an error listing the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise UnsupportedModelError(
            f"engram.hf does not know {type(model).__name__} (model_type {model_type!r}); "
            f"supported model types: {supported_models()}"
        )
    return family


def decoder_stack(model: nn.Module, family: Family) -> nn.Module:
    """The module holding the decoder layers: ``model.<stack_attr>`` for a causal LM, else the model itself."""
    stack = getattr(model, family.stack_attr, None)
    if isinstance(stack, nn.Module) and isinstance(getattr(stack, family.layers_attr, None), nn.ModuleList):
        return stack
    if isinstance(getattr(model, family.layers_attr, None), nn.ModuleList):
        return model
    raise UnsupportedModelError(
        f"{type(model).__name__} has model_type {family.model_type!r} but no decoder layers at "
        f"'{family.stack_attr}.{family.layers_attr}' or '{family.layers_attr}'"
    )


def decoder_layers(stack: nn.Module, family: Family) -> nn.ModuleList:
    return getattr(stack, family.layers_attr)


__all__ = ["FAMILIES", "Family", "UnsupportedModelError", "decoder_layers", "decoder_stack", "family_of", "supported_models"]
