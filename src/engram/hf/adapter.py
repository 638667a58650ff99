"""Add Engram to a Hugging Face ``transformers`` causal LM, in place.

``add_engram(model, tokenizer, layers=(1,), ...)`` puts one Engram layer (its table and gated fusion,
the same modules as ``engram.model``) before the attention of each chosen decoder layer:

    h <- h + Engram(h, hash ids)        then the decoder layer runs as before on h

Data flow of one forward:
  1. the decoder stack (``model.model`` / ``model.transformer``) receives ``input_ids``; a forward
     pre-hook on it hashes them once for all Engram layers (positions that ``attention_mask`` marks as
     padding hash as padding) and adds one keyword argument, ``engram_inputs`` (an ``EngramInputs``),
     to the call. HF passes extra keyword arguments on to every decoder layer;
  2. a forward pre-hook on every decoder layer takes ``engram_inputs`` out of its arguments (so HF's
     attention code never sees it) and, on Engram layers, adds the Engram output to the residual stream.
Nothing is kept on modules between calls: hash ids travel in the call's arguments, and the decoding
state (n-gram history, conv buffers) lives in the KV cache object (``EngramCache``) that HF hands back
and forth, so ``generate``, beam search included, carries and reorders it with the KV cache.

Zero init: the value projection and the short conv start at zero, so the adapted model's logits equal
the base model's exactly until training moves them (tested for every family).

The Engram parameters are registered under the decoder layer they serve (``...layers.1.engram.table.weight``):
they move with ``model.to(...)`` and with device maps. The ``EngramAdapter`` returned (also at
``engram_adapter(model)``) holds the config, the hasher and typed accessors for the parameters.

Shape legend: B batch, T new tokens in this call, S = past + T attention-mask length, D hidden size,
L Engram layers, H heads per Engram layer.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import DynamicCache

from engram.config import EngramConfig
from engram.data.bpe import SEPARATOR_CANDIDATES
from engram.hashing import NgramHasher
from engram.hf.cache import EngramCache, EngramDecodeState
from engram.hf.families import Family, decoder_layers, decoder_stack, family_of
from engram.hf.identity import base_identity
from engram.layers.engram import EngramFusion, EngramLayer
from engram.memory.table import EngramTable
from engram.model import build_engram_layer
from engram.tokenizer import CompressionMap, load_tokenizer, vocab_extent

ENGRAM_KWARG = "engram_inputs"  # the keyword argument the stack hook adds and the layer hooks remove


class VocabularyMismatchError(ValueError):
    """The tokenizer's ids do not fit the model's embedding."""


@dataclass
class EngramInputs:
    """What one forward hands every decoder layer (a call argument, never module state)."""

    hash_ids_BTLH: torch.Tensor  # int64, all Engram layers at once
    slot: dict[int, int]  # decoder index -> position on the L axis
    token_mask_BT: torch.Tensor | None  # bool, False = padding: zero gate, reads as pad (None: all real)
    state: EngramDecodeState | None  # decoding state from the cache (None: a plain full forward)


class DecoderEngram(EngramLayer):
    """The Engram layer in front of one decoder layer; knows its decoder index."""

    def __init__(self, table: EngramTable, fusion: EngramFusion, index: int) -> None:
        super().__init__(table, fusion)
        self.index = index

    def add_to(self, h_BTD: torch.Tensor, inputs: EngramInputs) -> torch.Tensor:
        """h + Engram(h): the residual stream with this layer's memory added (same dtype as h)."""
        for name in ("value_proj", "key_proj"):
            if getattr(self.fusion, name) is not None and type(getattr(self.fusion, name)) is not nn.Linear:
                raise TypeError(
                    f"Engram's {name} of decoder layer {self.index} was replaced by "
                    f"{type(getattr(self.fusion, name)).__name__} (an adapter such as LoRA targeting it?): "
                    "its wrapper would be ignored; leave value_proj and key_proj out of target_modules"
                )
        hash_ids_BTH = inputs.hash_ids_BTLH[:, :, inputs.slot[self.index]].to(self.table.weight.device)
        conv_state = inputs.state.conv.get(self.index) if inputs.state is not None else None
        # padding gets a zero gate, so its conv input is zero: a row reads its padding like a sequence start
        y_BT1D, _ = self(h_BTD.unsqueeze(2), hash_ids_BTH, None, conv_state, None, inputs.token_mask_BT)
        return h_BTD + y_BT1D[:, :, 0].to(h_BTD.dtype)


class EngramAdapter:
    """What ``add_engram`` attached to a model: config, hasher and the inserted layers."""

    def __init__(
        self,
        config: EngramConfig,
        hasher: NgramHasher,
        compression: CompressionMap,
        layers: dict[int, DecoderEngram],
        family: Family,
        identity: dict[str, Any],
    ) -> None:
        self.config, self.hasher, self.compression = config, hasher, compression
        self.layers, self.family, self.identity = layers, family, identity
        self.slot = {layer: j for j, layer in enumerate(hasher.layers)}

    # ------------------------------------------------------------------------------------ parameters

    def table_parameters(self) -> list[nn.Parameter]:
        """The memory tables: sparse row gradients, trained with ``SparseRowAdam`` at lr x5, no decay."""
        return [layer.table.weight for layer in self.layers.values()]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Gate projections, norms and conv weights: trained like the backbone."""
        return [p for layer in self.layers.values() for p in layer.fusion.parameters()]

    def parameters(self) -> list[nn.Parameter]:
        return self.table_parameters() + self.dense_parameters()

    # ------------------------------------------------------------------------------------ hashing

    def token_mask(self, attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
        """[B, T] bool, True = real token, from a 2-D attention mask over past + new tokens (None: all real)."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise ValueError(
                "Engram reads padding from a 2-D attention_mask [batch, past + new tokens] (1 = token, 0 = pad); "
                f"got shape {tuple(attention_mask.shape)}"
            )
        return attention_mask[:, -T:].to(torch.bool)

    def hash(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hash ids [B, T, L, H] of a whole sequence (padding hashes as padding)."""
        return self.hasher(input_ids, token_mask=self.token_mask(attention_mask, input_ids.shape[1]))

    def new_state(self, batch_size: int, device: torch.device) -> EngramDecodeState:
        conv = {
            i: layer.fusion.short_conv.init_state(batch_size, layer.table.weight.device)
            for i, layer in self.layers.items()
            if layer.fusion.short_conv is not None
        }
        return EngramDecodeState(self.hasher.init_state(batch_size, device), conv)

    def inputs_for(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: EngramCache | None
    ) -> EngramInputs:
        """Hash one call's tokens; with a cache, continue (and advance) its decoding state."""
        B, T = input_ids.shape
        mask_BT = self.token_mask(attention_mask, T)
        if cache is None:
            return EngramInputs(self.hasher(input_ids, token_mask=mask_BT), self.slot, mask_BT, None)
        if cache.engram_state is None:
            cache.engram_state = self.new_state(B, input_ids.device)
        state = cache.engram_state
        if state.batch_size != B:
            raise ValueError(f"the cache holds Engram state for {state.batch_size} rows, this call has {B}")
        hash_ids = self.hasher.step(input_ids, state.hash_state, token_mask=mask_BT)
        return EngramInputs(hash_ids, self.slot, mask_BT, state)


# ------------------------------------------------------------------------------------------- hooks


def _as_keywords(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments by name (HF calls the stack with keywords; a user may not)."""
    if not args:
        return kwargs
    names = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}.forward takes {len(names)} positional arguments, got {len(args)}")
    call = dict(zip(names, args))
    clash = sorted(set(call) & set(kwargs))
    if clash:
        raise TypeError(f"{type(module).__name__}.forward got multiple values for {clash}")
    return {**call, **kwargs}


def _engram_cache(stack: nn.Module, call: dict[str, Any]) -> EngramCache | None:
    """The call's cache as an ``EngramCache`` (created or swapped in when empty), or None without caching."""
    if "past_key_values" in call:  # the name older callers use
        call.setdefault("cache", call.pop("past_key_values"))
    cache = call.get("cache")
    use_cache = call.get("use_cache")
    if use_cache is None:
        use_cache = bool(getattr(stack.config, "use_cache", False))
    if isinstance(cache, EngramCache):
        return cache
    if cache is None:
        if not use_cache:
            return None
        offloading = False
    elif type(cache) is DynamicCache and cache.get_seq_length() == 0:
        offloading = cache.offloading  # generate's fresh cache: take it over with its settings
    elif isinstance(cache, DynamicCache) and cache.get_seq_length() > 0:
        raise ValueError(
            f"this cache already holds {cache.get_seq_length()} tokens but no Engram state; continue with the "
            "cache the Engram model returned (an EngramCache)"
        )
    else:
        raise ValueError(
            f"Engram keeps its decoding state in a dynamic cache (EngramCache); {type(cache).__name__} is not "
            "supported (leave cache_implementation unset)"
        )
    call["cache"] = EngramCache(config=stack.config, offloading=offloading)
    return call["cache"]


def _stack_pre_hook(stack: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    adapter: EngramAdapter = stack.engram_adapter
    call = _as_keywords(stack, args, kwargs)
    input_ids = call.get("input_ids")
    if input_ids is None:
        raise ValueError("Engram hashes token ids: call the model with input_ids (inputs_embeds alone cannot be hashed)")
    cache = _engram_cache(stack, call)
    call[ENGRAM_KWARG] = adapter.inputs_for(input_ids, call.get("attention_mask"), cache)
    return (), call


def _layer_pre_hook(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    inputs: EngramInputs | None = kwargs.pop(ENGRAM_KWARG, None)
    engram = layer._modules.get("engram")
    if engram is None:
        return args, kwargs
    if inputs is None:
        raise RuntimeError(
            f"decoder layer {engram.index} has Engram but was called without its hash ids: call the model "
            "(or its decoder stack), which hashes input_ids"
        )
    if args:
        return (engram.add_to(args[0], inputs), *args[1:]), kwargs
    kwargs["hidden_states"] = engram.add_to(kwargs["hidden_states"], inputs)
    return args, kwargs


# ------------------------------------------------------------------------------------ construction


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (``PeftModel.get_base_model()``), else the model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _backend_tokenizer(tokenizer: Any) -> Tokenizer:
    try:
        return load_tokenizer(tokenizer)
    except TypeError:
        raise TypeError(
            f"Engram needs a fast tokenizer (tokenizers.Tokenizer, a tokenizer.json path or a transformers fast "
            f"tokenizer); got {type(tokenizer).__name__}: load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        ) from None


def _first_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return int(value) if isinstance(value, int) and value >= 0 else None


def default_pad_id(tokenizer: Any, tok: Tokenizer, model_config: Any) -> int:
    """The raw id that positions before a sequence start (and padding) read: the tokenizer's pad token,
    else its end-of-sequence token, else a known document separator in its vocabulary, else the model
    config's pad or end-of-sequence id."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if (pad := _first_id(value)) is not None:
            return pad
    for token in SEPARATOR_CANDIDATES:
        if (pad := tok.token_to_id(token)) is not None:
            return pad
    for value in (getattr(model_config, "pad_token_id", None), getattr(model_config, "eos_token_id", None)):
        if (pad := _first_id(value)) is not None:
            return pad
    raise ValueError("no pad id found in the tokenizer or model config: pass pad_id=... to add_engram")


def check_vocabulary(model_config: Any, embedding_rows: int, n_ids: int) -> None:
    """Refuse a tokenizer that cannot be the model's: more ids than embedding rows, or special ids that the
    model config names (bos / eos / pad) outside the tokenizer's ids."""
    if n_ids > embedding_rows:
        raise VocabularyMismatchError(
            f"the tokenizer has {n_ids} ids but the model's embedding has only {embedding_rows} rows: "
            "they do not belong together"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(model_config, name, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v >= n_ids:
                raise VocabularyMismatchError(
                    f"the model config's {name}={v} is not an id of this tokenizer ({n_ids} ids): "
                    "they do not belong together"
                )


def hash_lookup(cmap: CompressionMap, embedding_rows: int, pad_id: int) -> np.ndarray:
    """Raw id -> canonical id over the whole embedding; rows past the tokenizer's ids read as padding."""
    surplus = np.full(embedding_rows - cmap.vocab_size, cmap.lookup[pad_id], dtype=np.int64)
    return np.concatenate([cmap.lookup, surplus])


def _resolve_config(config: EngramConfig | None, layers: Sequence[int] | None, settings: dict[str, Any]) -> EngramConfig:
    if layers is not None:
        settings = {**settings, "layers": tuple(layers)}
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(EngramConfig)})
    if unknown:
        raise TypeError(f"add_engram got unknown Engram settings {unknown}")
    cfg = dataclasses.replace(config if config is not None else EngramConfig(), **settings)
    if cfg.gate != "per_branch":
        raise ValueError("a transformers model has one residual stream: EngramConfig.gate must be 'per_branch'")
    return cfg


def _build_layer(cfg: EngramConfig, hasher: NgramHasher, index: int, d_model: int, device: torch.device) -> DecoderEngram:
    """One zero-initialised Engram layer: tables ~ N(0, init_std^2), value projection and conv at zero."""
    built = build_engram_layer(cfg, d_model, 1, hasher.head_sizes(index), f"engram.{index}", hasher.layout())
    layer = DecoderEngram(built.table, built.fusion, index).to(device)
    layer.reset_parameters()
    with torch.no_grad():
        layer.fusion.value_proj.weight.zero_()  # Y = 0: the adapted model starts as the base model
    return layer


@dataclass
class AdapterPlan:
    """Everything ``add_engram`` checks and computes before it touches the model."""

    base: nn.Module
    family: Family
    stack: nn.Module
    blocks: nn.ModuleList
    config: EngramConfig
    compression: CompressionMap
    hasher: NgramHasher
    identity: dict[str, Any]


def plan_adapter(
    model: nn.Module, tokenizer: Any, config: EngramConfig, compression: CompressionMap | None = None
) -> AdapterPlan:
    """Validate model, tokenizer and config together (raising on any mismatch) and build the hasher."""
    base = _unwrap(model)
    family = family_of(base)
    stack = decoder_stack(base, family)
    if "engram_adapter" in stack.__dict__:
        raise ValueError(f"{type(base).__name__} already has Engram at layers {list(stack.engram_adapter.layers)}")
    blocks = decoder_layers(stack, family)
    bad = [i for i in config.layers if i >= len(blocks)]
    if bad:
        raise IndexError(
            f"Engram layer indices {bad} out of range: {type(base).__name__} has {len(blocks)} decoder layers "
            f"(0..{len(blocks) - 1})"
        )
    tok = _backend_tokenizer(tokenizer)
    cmap = compression if compression is not None else CompressionMap.build(tok)
    if cmap.vocab_size != vocab_extent(tok):
        raise VocabularyMismatchError(f"the compression map covers {cmap.vocab_size} ids, the tokenizer {vocab_extent(tok)}")
    if not config.compress:
        cmap = CompressionMap.identity(cmap.vocab_size)
    rows = int(base.get_input_embeddings().weight.shape[0])
    check_vocabulary(base.config, rows, cmap.vocab_size)
    if config.pad_id >= cmap.vocab_size:
        raise ValueError(f"pad_id {config.pad_id} is outside the tokenizer's {cmap.vocab_size} ids")
    hasher = NgramHasher.from_config(config, hash_lookup(cmap, rows, config.pad_id))
    return AdapterPlan(base, family, stack, blocks, config, cmap, hasher, base_identity(base, tok, cmap))


def attach(plan: AdapterPlan) -> EngramAdapter:
    """Insert the planned Engram layers and hooks into the model; return the adapter."""
    cfg, blocks = plan.config, plan.blocks
    d_model = int(plan.base.config.hidden_size)
    engrams: dict[int, DecoderEngram] = {}
    for i in cfg.layers:
        device = next(blocks[i].parameters()).device
        engrams[i] = _build_layer(cfg, plan.hasher, i, d_model, device)
        blocks[i].add_module("engram", engrams[i])
    for block in blocks:  # every layer drops the hook's keyword argument; Engram layers use it
        block.register_forward_pre_hook(_layer_pre_hook, with_kwargs=True)
    plan.stack.register_forward_pre_hook(_stack_pre_hook, with_kwargs=True)
    adapter = EngramAdapter(cfg, plan.hasher, plan.compression, engrams, plan.family, plan.identity)
    plan.stack.engram_adapter = adapter  # a plain attribute (not a module): the layers are registered once, above
    return adapter


def add_engram(
    model: nn.Module,
    tokenizer: Any,
    layers: Sequence[int] | None = None,
    *,
    config: EngramConfig | None = None,
    compression: CompressionMap | None = None,
    **settings: Any,
) -> EngramAdapter:
    """Insert Engram before the attention of decoder ``layers`` of ``model`` (in place); return the adapter.

    ``tokenizer``: the model's tokenizer (a transformers fast tokenizer, a ``tokenizers.Tokenizer`` or a
    tokenizer.json path); its compression map is built unless ``compression`` is given. Engram settings
    come from ``config`` (an ``EngramConfig``) and/or keyword ``settings`` (``max_ngram``, ``heads``,
    ``table_sizes``, ``d_mem``, ``seed``, ``pad_id``, ``use_conv``, ``table_dtype``, ...); ``pad_id``
    defaults to the tokenizer's pad (else end-of-sequence) id. ``layers`` defaults to the config's (1,).
    """
    if config is None and "pad_id" not in settings:
        settings = {**settings, "pad_id": default_pad_id(tokenizer, _backend_tokenizer(tokenizer), _unwrap(model).config)}
    cfg = _resolve_config(config, layers, settings)
    return attach(plan_adapter(model, tokenizer, cfg, compression))


def engram_adapter(model: nn.Module) -> EngramAdapter:
    """The adapter ``add_engram`` attached to ``model`` (also through a peft wrapper)."""
    base = _unwrap(model)
    stack = decoder_stack(base, family_of(base))
    adapter = stack.__dict__.get("engram_adapter")
    if adapter is None:
        raise ValueError(f"{type(base).__name__} has no Engram adapter: call engram.hf.add_engram first")
    return adapter


__all__ = [
    "ENGRAM_KWARG",
    "AdapterPlan",
    "DecoderEngram",
    "EngramAdapter",
    "EngramInputs",
    "VocabularyMismatchError",
    "add_engram",
    "attach",
    "check_vocabulary",
    "default_pad_id",
    "engram_adapter",
    "hash_lookup",
    "plan_adapter",
]
