"""EngramLM: a decoder LM with conditional memory (Engram) on a DeepSeekMoE / mHC backbone.

Read top to bottom: the block, the OverEncoding baseline, the model (init, accounting, forward,
incremental decoding).

Block (M residual streams x [B, T, M, D]; M = 1 is a plain residual network):
    x <- x + Engram(x, hash ids)                    (Engram blocks only; before attention, SPEC section 3)
    x <- HC_attn.post(Attention(norm(HC_attn.pre(x))), x)
    x <- HC_ffn.post(FFN-or-MoE(norm(HC_ffn.pre(x))), x)
With ``EngramConfig.gate == "single"`` (the paper's ablation), Engram is one more mHC sublayer: it
fuses once after the pre-mapping, with a single gate, and its output is distributed by the post-mapping.

Hashing is a pure function of token ids and happens once for all Engram layers (``EngramLM.hash``),
normally in the data loader; ``forward`` calls it only when no hash ids are passed.

A token mask ([B, T] bool, True = real token; False for image tokens or left padding) makes masked
tokens hash as padding and gives them a zero Engram gate (``NgramHasher``, ``EngramFusion``). It touches
nothing else: attention masking is the caller's concern.

Shape legend: B batch, T time, D d_model, M streams, V vocab, L Engram layers, H heads per Engram layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engram.config import EngramConfig, ModelConfig
from engram.hashing import HashState, NgramHasher
from engram.layers.attention import Attention, KVCache
from engram.layers.engram import ConvState, EngramFusion, EngramLayer
from engram.layers.ffn import SwiGLU
from engram.layers.hyper import HyperConnection, expand_streams, reduce_streams
from engram.layers.moe import MoE
from engram.layers.norms import RMSNorm
from engram.memory.placement import Placement
from engram.memory.table import EngramTable


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V] (compute dtype)
    loss: torch.Tensor | None  # fp32 scalar: cross-entropy + MoE auxiliary loss
    ce_loss: torch.Tensor | None  # fp32 scalar: cross-entropy alone
    aux_loss: torch.Tensor | None
    gates: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> Engram gate [B, T, M]


@dataclass
class DecodeState:
    """Everything incremental decoding carries between calls, for a batch of sequences."""

    caches: list[KVCache]
    hash_state: HashState | None
    conv_states: dict[int, ConvState]
    lengths: torch.Tensor  # [B] tokens consumed per row
    pad_id: int = 0  # the hasher's canonical pad: what a fresh row's n-gram history holds

    def reset_rows(self, rows: list[int]) -> None:
        """Make ``rows`` fresh sequences (a finished row's slot reused for a waiting prompt): empty KV
        caches (stale slots are masked by their lengths), pad n-gram history, zero conv history."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        for cache in self.caches:
            cache.lengths[idx] = 0
        if self.hash_state is not None:
            self.hash_state.history[idx] = self.pad_id
        for conv in self.conv_states.values():
            conv.buffer[idx] = 0
        self.lengths[idx] = 0


class Block(nn.Module):
    """One decoder block; see the module docstring for the data flow."""

    def __init__(
        self,
        attn: Attention,
        ffn: nn.Module,
        hc_mult: int,
        sinkhorn_iters: int,
        engram: EngramLayer | None = None,
        engram_single: bool = False,
    ) -> None:
        super().__init__()
        d = attn.d_model
        self.attn_norm = RMSNorm(d)
        self.attn = attn
        self.hc_attn = HyperConnection(d, hc_mult, sinkhorn_iters)
        self.ffn_norm = RMSNorm(d)
        self.ffn = ffn
        self.hc_ffn = HyperConnection(d, hc_mult, sinkhorn_iters)
        self.engram = engram
        self.hc_engram = HyperConnection(d, hc_mult, sinkhorn_iters) if engram is not None and engram_single else None

    def forward(
        self,
        x_BTMD: torch.Tensor,
        segment_ids: torch.Tensor | None,
        hash_ids_BTH: torch.Tensor | None,
        cache: KVCache | None = None,
        conv_state: ConvState | None = None,
        lengths: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        rows_BTHD: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        gate = None
        if self.engram is not None:
            if self.hc_engram is None:  # per-branch gating, output added to every stream
                y_BTMD, gate = self.engram(x_BTMD, hash_ids_BTH, segment_ids, conv_state, lengths, token_mask,
                                           rows_BTHD)
                x_BTMD = x_BTMD + y_BTMD.to(x_BTMD.dtype)
            else:  # single fusion after the pre-mapping
                h_BTD, st = self.hc_engram.pre(x_BTMD)
                y_BT1D, gate = self.engram(h_BTD.unsqueeze(2), hash_ids_BTH, segment_ids, conv_state, lengths,
                                           token_mask, rows_BTHD)
                x_BTMD = self.hc_engram.post(y_BT1D[:, :, 0], x_BTMD, st)
        h_BTD, st = self.hc_attn.pre(x_BTMD)
        a_BTD = self.attn(self.attn_norm(h_BTD), segment_ids if cache is None else None, cache, lengths)
        x_BTMD = self.hc_attn.post(a_BTD, x_BTMD, st)
        h_BTD, st = self.hc_ffn.pre(x_BTMD)
        x_BTMD = self.hc_ffn.post(self.ffn(self.ffn_norm(h_BTD)), x_BTMD, st)
        return x_BTMD, gate


class OverEncoding(nn.Module):
    """Baseline: hashed n-gram embeddings (same hasher) averaged with the token embedding at the input."""

    def __init__(self, head_sizes: list[int], d_model: int, hash_layout: dict | None = None) -> None:
        super().__init__()
        self.table = EngramTable(head_sizes, d_model, name="overencoding", hash_layout=hash_layout)

    def reset_parameters(self, std: float) -> None:
        self.table.init_std = std
        self.table.reset_parameters()

    def forward(self, x_BTD: torch.Tensor, hash_ids_BTH: torch.Tensor) -> torch.Tensor:
        rows_BTHD = self.table(hash_ids_BTH)
        return (x_BTD + rows_BTHD.sum(-2).to(x_BTD.dtype)) / (1 + self.table.num_heads)


class EngramLM(nn.Module):
    """The language model. Built from a ``ModelConfig`` and, with Engram or OverEncoding, the tokenizer
    compression lookup (raw id -> canonical id; identity when omitted or when compression is off)."""

    def __init__(self, cfg: ModelConfig, lookup: np.ndarray | torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.hasher: NgramHasher | None = None
        self._head_sizes_cache: dict[torch.device, torch.Tensor] = {}
        hash_cfg = cfg.engram if cfg.engram is not None else cfg.overencoding
        if hash_cfg is not None:
            use_lookup = lookup is not None and getattr(hash_cfg, "compress", True)
            # the lookup is host data whatever the default device (meta included)
            lk = torch.tensor(np.asarray(lookup), device="cpu") if use_lookup else torch.arange(cfg.vocab_size, device="cpu")
            if lk.numel() != cfg.vocab_size:
                raise ValueError(f"compression lookup covers {lk.numel()} ids, model vocab_size is {cfg.vocab_size}")
            self.hasher = NgramHasher.from_config(hash_cfg, lk)

        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        self.overencoding = None
        if cfg.overencoding is not None:
            self.overencoding = OverEncoding(self.hasher.head_sizes(self.hasher.layers[0]), D, self.hasher.layout())
        self.blocks = nn.ModuleList(self._build_block(i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the LM head with the token embedding when configured (again after ``to_empty``)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _build_block(self, i: int) -> Block:
        cfg = self.cfg
        attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.rope_theta, cfg.max_seq_len)
        moe = cfg.moe
        if moe is not None and i >= moe.first_dense:
            ffn: nn.Module = MoE(cfg.d_model, moe.d_expert, moe.n_routed, moe.n_shared, moe.top_k, moe.score_func,
                                 moe.route_scale, moe.bias_update_rate, moe.aux_loss_coef)
        else:
            ffn = SwiGLU(cfg.d_model, cfg.d_ff)
        engram = None
        e = cfg.engram
        if e is not None and i in e.layers:
            engram = build_engram_layer(e, cfg.d_model, cfg.hc_mult, self.hasher.head_sizes(i), f"engram.{i}",
                                        self.hasher.layout())
        return Block(attn, ffn, cfg.hc_mult, cfg.sinkhorn_iters, engram, e is not None and e.gate == "single")

    # ------------------------------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self) -> None:
        """The one place every tensor is initialised.

        Token embedding ~ N(0, 1); LM head ~ N(0, 1/D); attention/FFN inputs per their modules; every
        residual branch's output projection (attention wo, FFN/expert w2, Engram W_V) starts at zero, so
        a new model is the identity on its streams; the Engram short conv starts at zero (identity on
        v~); tables ~ N(0, table_init_std^2); OverEncoding rows ~ N(0, 1) like the token embedding.
        """
        if self.tok_emb.weight.device.type == "meta":
            return  # shapes only: nothing to initialise (``to_empty`` + ``init_weights`` materialises)
        nn.init.normal_(self.tok_emb.weight, 0.0, 1.0)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, 1.0 / math.sqrt(self.cfg.d_model))
        self.norm.reset_parameters()
        if self.overencoding is not None:
            self.overencoding.reset_parameters(1.0)
        for blk in self.blocks:
            blk.attn_norm.reset_parameters()
            blk.ffn_norm.reset_parameters()
            blk.attn.reset_parameters(out_std=0.0)
            blk.ffn.reset_parameters(out_std=0.0)
            for hc in (blk.hc_attn, blk.hc_ffn, blk.hc_engram):
                if hc is not None:
                    hc.reset_parameters()
            if blk.engram is not None:
                blk.engram.reset_parameters()
                nn.init.zeros_(blk.engram.fusion.value_proj.weight)
            if isinstance(blk.ffn, MoE):
                blk.ffn.expert_bias.zero_()
                blk.ffn.expert_load.zero_()

    # ----------------------------------------------------------------------------------- groups/state

    def engram_layers(self) -> dict[int, EngramLayer]:
        return {i: b.engram for i, b in enumerate(self.blocks) if b.engram is not None}

    def memory_tables(self) -> dict[str, EngramTable]:
        """Every hashed-memory table by its layout name ("engram.<block>", "overencoding"): the one
        accessor the optimizer, checkpoints, accounting and tier placement use."""
        out = {layer.table.layout.name: layer.table for layer in self.engram_layers().values()}
        if self.overencoding is not None:
            out[self.overencoding.table.layout.name] = self.overencoding.table
        return out

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    @torch.no_grad()
    def update_moe_bias(self) -> None:
        """Loss-free balancing: call after each optimizer step (outside autograd)."""
        for moe in self.moe_layers():
            moe.update_bias()

    def hash_layout(self) -> dict | None:
        return self.hasher.layout() if self.hasher is not None else None

    def hash_fingerprint(self) -> str | None:
        """sha256 of the hash layout: checkpoints and table files record it and are refused under another."""
        return self.hasher.fingerprint() if self.hasher is not None else None

    # --------------------------------------------------------------------------------------- forward

    def hash(
        self, ids: torch.Tensor, segment_ids: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Hash ids [B, T, L, H] for all Engram layers at once (None for a model without memory)."""
        return self.hasher(ids, segment_ids, token_mask=token_mask) if self.hasher is not None else None

    def _embed(self, ids: torch.Tensor, hash_ids: torch.Tensor | None) -> torch.Tensor:
        x_BTD = self.tok_emb(ids)
        if self.overencoding is not None:
            x_BTD = self.overencoding(x_BTD, hash_ids[:, :, 0])
        return expand_streams(x_BTD, self.cfg.hc_mult)  # [B, T, M, D]

    def _head(self, x_BTMD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(reduce_streams(x_BTMD)))

    def _check_ids(self, ids: torch.Tensor, past: int = 0) -> None:
        """Token ids [B, T]: integers inside the vocabulary, T (after ``past`` cached tokens) within the context."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be [B, T], got shape {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        if past + ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {past + ids.shape[1]} tokens exceeds the model's context of {self.cfg.max_seq_len} "
                "(ModelConfig.max_seq_len)"
            )
        if ids.numel() and not _in_range(ids, self.cfg.vocab_size):
            bad = ((ids < 0) | (ids >= self.cfg.vocab_size)).nonzero()[0].tolist()
            raise ValueError(f"token id {int(ids[tuple(bad)])} at position {tuple(bad)} outside [0, {self.cfg.vocab_size})")

    def _head_sizes(self, device: torch.device) -> torch.Tensor:
        """Table size of every (Engram layer, head) [L, H] int64 on ``device`` (derived, cached per device)."""
        if device not in self._head_sizes_cache:
            sizes = [self.hasher.head_sizes(layer) for layer in self.hasher.layers]
            self._head_sizes_cache[device] = torch.tensor(sizes, dtype=torch.int64, device="cpu").to(device)
        return self._head_sizes_cache[device]

    def _check_hash_ids(self, hash_ids: torch.Tensor, B: int, T: int) -> None:
        """Caller-supplied hash ids [B, T, L, H]: the right shape and each id inside its own head's table
        (an id past its head but inside the flat table would silently read a neighbouring head's row).
        One reduction for all layers; on CUDA a device-side assert, so no host sync."""
        want = (B, T, self.hasher.num_layers, self.hasher.heads_per_layer)
        if tuple(hash_ids.shape) != want:
            raise ValueError(f"hash_ids shape {tuple(hash_ids.shape)} != expected {want}")
        if hash_ids.is_floating_point() or hash_ids.dtype == torch.bool:
            raise TypeError(f"hash_ids must be an integer tensor, got {hash_ids.dtype}")
        if not hash_ids.numel():
            return
        sizes_LH = self._head_sizes(hash_ids.device)
        bad = (hash_ids < 0) | (hash_ids >= sizes_LH)
        if hash_ids.device.type == "cuda":
            torch._assert_async(~bad.any(), "engram: a hash id lies outside its head's table")
        elif bool(bad.any()):
            b, t, j, h = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"hash id {int(hash_ids[b, t, j, h])} at batch {b}, position {t}, Engram layer "
                f"{self.hasher.layers[j]}, head {h} lies outside that head's table of {int(sizes_LH[j, h])} rows"
            )

    def forward(
        self,
        ids: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        hash_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        return_gates: bool = False,
        return_logits: bool = True,
        token_mask: torch.Tensor | None = None,
        memory_rows: dict[int, torch.Tensor] | None = None,
    ) -> ModelOutput:
        """ids [B, T]; segment ids [B, T] for packed documents; hash ids [B, T, L, H] (computed when
        absent; precomputed ones must have been hashed with the same ``token_mask``); targets [B, T] with
        -100 = ignore; token_mask [B, T] bool, True = real token (module docstring); memory_rows: block ->
        its Engram rows [B, T, H, Dh] gathered ahead of time (a prefetcher's; no gradient reaches them)."""
        self._check_ids(ids)
        if self.hasher is not None:
            if hash_ids is None:
                hash_ids = self.hasher(ids, segment_ids, check=False, token_mask=token_mask)  # correct by construction
            else:
                self._check_hash_ids(hash_ids, *ids.shape)
        layer_slot = {layer: j for j, layer in enumerate(self.hasher.layers)} if self.cfg.engram else {}
        x = self._embed(ids, hash_ids)
        gates: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks):
            h_ids = hash_ids[:, :, layer_slot[i]] if i in layer_slot else None
            rows = memory_rows.get(i) if memory_rows is not None else None
            x, gate = blk(x, segment_ids, h_ids, token_mask=token_mask, rows_BTHD=rows)
            if gate is not None and return_gates:
                gates[i] = gate
        logits = self._head(x)
        loss = ce = aux = None
        if targets is not None:
            ce = masked_cross_entropy(logits, targets)
            aux = sum((m.aux_loss for m in self.moe_layers()), ce.new_zeros(()))
            loss = ce + aux
        return ModelOutput(logits if return_logits else None, loss, ce, aux, gates)

    # ---------------------------------------------------------------------------- incremental decoding

    def new_decode_state(self, batch: int, max_len: int | None = None) -> DecodeState:
        dev = self.tok_emb.weight.device
        max_len = max_len or self.cfg.max_seq_len
        caches = [blk.attn.new_cache(batch, max_len, dev) for blk in self.blocks]
        conv = {
            i: layer.fusion.short_conv.init_state(batch, dev)
            for i, layer in self.engram_layers().items()
            if layer.fusion.short_conv is not None
        }
        hs = self.hasher.init_state(batch, dev) if self.hasher is not None else None
        pad = self.hasher.pad_id if self.hasher is not None else 0
        return DecodeState(caches, hs, conv, torch.zeros(batch, dtype=torch.int64, device=dev), pad)

    @torch.no_grad()
    def forward_chunk(
        self,
        ids: torch.Tensor,
        state: DecodeState,
        lengths: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        hash_ids: torch.Tensor | None = None,
        memory_rows: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Consume a chunk [B, T] (row b's first ``lengths[b]`` tokens are real; default all), updating
        ``state``; returns logits [B, T, V]. Prefill is one chunk; a decode step is a chunk with T = 1
        and lengths = 1 for active rows, 0 for finished ones. ``token_mask`` [B, T] as in ``forward``.
        ``hash_ids`` / ``memory_rows``: what a prefetcher computed ahead for this chunk (``hash_ids`` must
        come from ``self.hasher.step`` on this state, which then is not advanced again here)."""
        B, T = ids.shape
        lengths = torch.full((B,), T, dtype=torch.int64, device=ids.device) if lengths is None else lengths.long()
        # each row's own length: rows of different lengths (slots reused by new prompts) share a chunk
        self._check_ids(ids, past=int((state.lengths + lengths).max()) - T if B else 0)
        if self.hasher is not None and hash_ids is None:
            hash_ids = self.hasher.step(ids, state.hash_state, lengths, check=False, token_mask=token_mask)
        layer_slot = {layer: j for j, layer in enumerate(self.hasher.layers)} if self.cfg.engram else {}
        x = self._embed(ids, hash_ids)
        for i, blk in enumerate(self.blocks):
            h_ids = hash_ids[:, :, layer_slot[i]] if i in layer_slot else None
            rows = memory_rows.get(i) if memory_rows is not None else None
            x, _ = blk(x, None, h_ids, state.caches[i], state.conv_states.get(i), lengths, token_mask, rows)
        state.lengths += lengths
        return self._head(x)

    def decode_step(self, ids_B: torch.Tensor, state: DecodeState, active: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row [B] -> logits [B, V]; rows with ``active`` False do not advance."""
        lengths = None if active is None else active.to(torch.int64)
        return self.forward_chunk(ids_B[:, None], state, lengths)[:, 0]

    # ------------------------------------------------------------------------------------ accounting

    def param_counts(self) -> dict[str, int]:
        """Parameter counts by group, plus P_tot / P_act / P_sparse as SPEC section 4 defines them.

        P_tot excludes the vocab embedding and LM head. Activated: everything a token uses, i.e. P_tot less
        the routed experts it does not select and less the memory tables (a lookup touches a handful
        of rows: counted as sparse, like the paper).
        """
        groups = parameter_groups(self)
        routed_active = 0
        for moe in self.moe_layers():
            n = sum(getattr(moe, k).numel() for k in ("experts_w1", "experts_w2", "experts_w3"))
            routed_active += n * moe.top_k // moe.n_routed
        total = sum(groups.values())
        p_tot = total - groups["embedding"] - groups["lm_head"]
        p_act = p_tot - groups["moe_routed"] + routed_active - groups["engram_tables"] - groups["overencoding_tables"]
        return {**groups, "total": total, "P_tot": p_tot, "P_act": p_act, "P_sparse": p_tot - p_act,
                "moe_routed_active": routed_active}

    def flops_per_token(self, seq_len: int | None = None) -> dict[str, float]:
        """Training FLOPs per token (forward + backward = 3x forward); lookups excluded (no FLOPs)."""
        c = self.param_counts()
        T = seq_len or self.cfg.max_seq_len
        matmul = c["P_act"] - c["norms"] + c["lm_head"]  # every activated weight is one multiply-add
        attn = 2 * self.cfg.n_layers * T * self.cfg.n_heads * self.cfg.d_head  # QK^T and AV, causal half
        fwd = 2 * matmul + attn
        return {"forward": float(fwd), "train": float(3 * fwd)}

    def table_bytes(self) -> int:
        """Bytes of every table's rows in their training dtype, wherever they live."""
        return sum(t.layout.nbytes for t in self.memory_tables().values())


def _in_range(ids: torch.Tensor, n: int) -> bool:
    lo, hi = torch.aminmax(ids)  # one pass, one host sync
    return int(lo) >= 0 and int(hi) < n


def masked_cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss (fp32) over targets != -100; exactly 0 when a batch has none (instead of
    NaN), so a batch whose targets are all masked contributes nothing. No host sync."""
    flat = logits_BTV.float().reshape(-1, logits_BTV.shape[-1])
    total = F.cross_entropy(flat, targets_BT.reshape(-1), ignore_index=-100, reduction="sum")
    return total / (targets_BT != -100).sum().clamp_min(1)


PARAM_GROUPS = ("embedding", "lm_head", "attention", "dense_ffn", "moe_routed", "moe_shared", "moe_router",
                "engram_tables", "engram_dense", "overencoding_tables", "hyper_connections", "norms")
_MOE_CHILDREN = {"router": "moe_router", "shared": "moe_shared"}


def parameter_groups(model: EngramLM) -> dict[str, int]:
    """Parameter count per group, classified by the type of the module that owns each parameter (not by
    its name), raising on a parameter no rule covers. Tables count by their layout, wherever their rows
    live (device, host, disk): accounting does not depend on placement."""
    groups = dict.fromkeys(PARAM_GROUPS, 0)
    seen: set[int] = set()

    def visit(mod: nn.Module, path: str, group: str | None) -> None:
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen or isinstance(mod, EngramTable):  # tied weights count once; tables below
                continue
            seen.add(id(p))
            if group is None:
                raise TypeError(f"parameter accounting: no group for {path}{pname} of a {type(mod).__name__}")
            groups[group] += p.numel()
        for cname, child in mod.named_children():
            visit(child, f"{path}{cname}.", _child_group(model, mod, cname, child, group))

    visit(model, "", None)
    for t in model.memory_tables().values():
        groups["overencoding_tables" if t.layout.name == "overencoding" else "engram_tables"] += t.layout.num_params
    return groups


def _child_group(model: EngramLM, parent: nn.Module, name: str, child: nn.Module, inherited: str | None) -> str | None:
    """The group of ``child``'s own parameters, from its type and where it sits."""
    if child is model.tok_emb:
        return "embedding"
    if child is model.lm_head:
        return "lm_head"
    if isinstance(parent, MoE):
        return _MOE_CHILDREN.get(name)
    if inherited is not None:  # inside an Engram layer, attention, MoE, ...: the whole subtree is that group
        return inherited
    if isinstance(child, EngramLayer) or (isinstance(child, HyperConnection) and name == "hc_engram"):
        return "engram_dense"
    kinds = ((OverEncoding, "overencoding_tables"), (Attention, "attention"), (MoE, "moe_routed"),
             (SwiGLU, "dense_ffn"), (HyperConnection, "hyper_connections"), (RMSNorm, "norms"))
    return next((g for kind, g in kinds if isinstance(child, kind)), None)


def build_engram_layer(cfg: EngramConfig, d_model: int, hc_mult: int, head_sizes: list[int], name: str = "table",
                       hash_layout: dict | None = None) -> EngramLayer:
    """One Engram layer (table + fusion) as ``cfg`` describes it, for a backbone of width ``d_model`` with
    ``hc_mult`` streams; ``head_sizes`` are the layer's prime table sizes (``NgramHasher.head_sizes``),
    ``name`` and ``hash_layout`` go into the table's layout (what its rows mean)."""
    n_branches = 1 if cfg.gate == "single" else hc_mult
    table = EngramTable(head_sizes, cfg.d_head, cfg.table_dtype, cfg.table_init_std, name=name, hash_layout=hash_layout)
    fusion = EngramFusion(
        cfg.d_mem, d_model, n_branches, cfg.kernel_size if cfg.use_conv else None, cfg.dilation, cfg.signed_sqrt,
        bias=cfg.proj_bias, gate_eps=cfg.gate_norm_eps, conv_eps=cfg.conv_norm_eps, use_gate=cfg.use_gate,
    )
    return EngramLayer(table, fusion)


def build_model(cfg: ModelConfig, lookup=None, device: torch.device | str | None = None,
                placement: Placement | None = None) -> EngramLM:
    """Build a model and initialise every tensor once; on ``device='meta'`` only shapes exist (no memory).

    Built on the meta device, materialised with ``to_empty`` and initialised by ``init_weights``: leaf
    modules' own constructor-time init would otherwise fill every tensor (multi-GB tables too) twice.
    ``placement`` puts the tables on a tier before anything is materialised, so a table served from
    disk never occupies memory.
    """
    with torch.device("meta"):
        model = EngramLM(cfg, lookup)
    if placement is not None and placement.tier == "disk":
        placement.apply(model.memory_tables())
    if device is not None and torch.device(device).type == "meta":
        return model
    model = model.to_empty(device=device if device is not None else "cpu")
    model.tie_weights()
    model.init_weights()
    if placement is not None and placement.tier != "disk":
        placement.apply(model.memory_tables())
    return model


__all__ = ["Block", "DecodeState", "EngramLM", "ModelOutput", "OverEncoding", "build_engram_layer", "build_model",
           "masked_cross_entropy"]
