"""Engram fusion (SPEC section 3): gate retrieved memory by the hidden state and add it to the residual.

Steps, per position t and branch m (M residual streams; M = 1 is a plain residual network):
  1. e_t = concatenation of the retrieved rows of all heads                      [B, T, E]
  2. v = W_V e_t (shared), k_m = W_K^(m) e_t (one per branch), in ONE matmul     [B, T, (M+1) D]
  3. alpha_m = sigmoid(ssqrt(RMSNorm_q^m(h_m) . RMSNorm_k^m(k_m) / sqrt(D)))     [B, T, M]  (fp32)
     ssqrt(s) = sign(s) sqrt(max(|s|, 1e-6)), on by default (every public code path uses it);
     alpha = 1 without a gate (ablation); alpha = 0 where a token mask marks a token as masked
  4. v~_m = alpha_m v                                                           [B, T, M, D]
  5. optional short conv: Y = v~ + SiLU(CausalDepthwiseConv(RMSNorm(v~))), kernel 4, dilation N,
     zero-initialised so a new module is the identity on v~; it never reads across documents
  6. the caller adds Y to the residual streams before the block's attention.

Token mask ([B, T] bool, True = real token): a masked position gets alpha = 0 and Y = 0, so the block
leaves it unchanged, exactly; the conv reads it as zero (its v~ is 0), like a position before the start.
The reference settings (biases, norm epsilons, no conv) are options here; docs/interop.md maps them.

Shape legend: B batch, T time, M branches (residual streams), D model width, E = d_mem retrieval width,
H heads, Dh = E / H row width, C = M * D conv channels, S = (kernel - 1) * dilation conv history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engram.memory.table import EngramTable


def signed_sqrt(s: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """sign(s) * sqrt(max(|s|, eps)): compresses large gate logits; gradient stays finite at 0."""
    return s.sign() * s.abs().clamp_min(eps).sqrt()


def doc_start_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] index of the first position of each position's document (segments are contiguous runs)."""
    B, T = segment_ids.shape
    opens = torch.ones_like(segment_ids, dtype=torch.bool)
    opens[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    pos = torch.arange(T, device=segment_ids.device).expand(B, T)
    return torch.where(opens, pos, torch.zeros_like(pos)).cummax(dim=1).values


class BranchRMSNorm(nn.Module):
    """M independent RMSNorms over the last dim of [..., M, D], computed in fp32."""

    def __init__(self, n_branches: int, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_branches, dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


@dataclass
class ConvState:
    """Incremental short-conv state: the last S normalised inputs of each sequence."""

    buffer: torch.Tensor  # [B, S, C]


class ShortConv(nn.Module):
    """Causal depthwise dilated conv over M branches: x [B, T, M, D] -> SiLU(conv(RMSNorm(x))) same shape.

    Written as a sum over K shifted taps (K = 4), which makes document masking and incremental decoding
    exact and simple; ``tests`` check it against ``nn.Conv1d``.
    """

    def __init__(self, dim: int, n_branches: int, kernel_size: int = 4, dilation: int = 1, eps: float = 1e-6) -> None:
        super().__init__()
        if kernel_size < 1 or dilation < 1:
            raise ValueError(f"kernel_size and dilation must be >= 1, got {kernel_size}, {dilation}")
        self.dim, self.n_branches = dim, n_branches
        self.kernel_size, self.dilation = kernel_size, dilation
        self.norm = BranchRMSNorm(n_branches, dim, eps)
        # weight[c, j] multiplies the input j * dilation steps back (j = 0 is the current position)
        self.weight = nn.Parameter(torch.zeros(n_branches * dim, kernel_size))

    @property
    def history(self) -> int:
        return (self.kernel_size - 1) * self.dilation

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)  # identity at init: Y = v~ + SiLU(0) = v~
        self.norm.reset_parameters()

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> ConvState:
        return ConvState(torch.zeros(batch_size, self.history, self.n_branches * self.dim, device=device, dtype=dtype))

    def forward(
        self,
        x_BTMD: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        state: ConvState | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, M, D = x_BTMD.shape
        S = self.history
        z_BTC = self.norm(x_BTMD).reshape(B, T, M * D)  # fp32
        past_BSC = state.buffer.to(z_BTC.dtype) if state is not None else z_BTC.new_zeros(B, S, M * D)
        ext_BXC = torch.cat([past_BSC, z_BTC], dim=1)  # [B, S + T, C]; zeros before sequence start
        starts_BT = doc_start_positions(segment_ids) if segment_ids is not None else None
        t_T = torch.arange(T, device=x_BTMD.device)
        w_CK = self.weight.float()
        y_BTC = z_BTC * w_CK[:, 0]
        for j in range(1, self.kernel_size):
            back = j * self.dilation
            tap_BTC = ext_BXC[:, S - back : S - back + T]
            if starts_BT is not None:  # the tap reads another document: treat it as sequence start (zero)
                tap_BTC = tap_BTC * ((t_T - back) >= starts_BT).unsqueeze(-1)
            y_BTC = y_BTC + tap_BTC * w_CK[:, j]
        if state is not None:
            if lengths is None:
                state.buffer = ext_BXC[:, T:].contiguous()
            else:
                idx = lengths.to(ext_BXC.device).long()[:, None] + torch.arange(S, device=ext_BXC.device)
                state.buffer = ext_BXC.gather(1, idx[:, :, None].expand(B, S, M * D))
        return F.silu(y_BTC).reshape(B, T, M, D).to(x_BTMD.dtype)


class EngramFusion(nn.Module):
    """Context-aware gating of retrieved memory e [B, T, E] by hidden streams h [B, T, M, D].

    Keyword options (defaults are ours; DeepSeek's settings in docs/interop.md): ``bias`` on W_V and W_K;
    ``gate_eps`` / ``conv_eps``, the RMSNorm epsilons of the gate's query/key norms and of the conv's
    norm; ``use_gate=False`` fixes alpha at 1 and builds neither W_K nor the gate norms.
    """

    def __init__(
        self,
        d_mem: int,
        d_model: int,
        n_branches: int = 1,
        conv_kernel: int | None = 4,
        conv_dilation: int = 3,
        signed_sqrt: bool = True,
        *,
        bias: bool = False,
        gate_eps: float = 1e-6,
        conv_eps: float = 1e-6,
        use_gate: bool = True,
    ) -> None:
        super().__init__()
        if n_branches < 1:
            raise ValueError(f"n_branches must be >= 1, got {n_branches}")
        self.d_mem, self.d_model, self.n_branches = d_mem, d_model, n_branches
        self.use_signed_sqrt = signed_sqrt
        self.value_proj = nn.Linear(d_mem, d_model, bias=bias)  # W_V, shared by all branches
        self.key_proj = self.norm_q = self.norm_k = None
        if use_gate:
            self.key_proj = nn.Linear(d_mem, n_branches * d_model, bias=bias)  # W_K^(m) stacked
            self.norm_q = BranchRMSNorm(n_branches, d_model, gate_eps)
            self.norm_k = BranchRMSNorm(n_branches, d_model, gate_eps)
        self.short_conv = (
            ShortConv(d_model, n_branches, conv_kernel, conv_dilation, conv_eps) if conv_kernel else None
        )

    @property
    def use_gate(self) -> bool:
        return self.key_proj is not None

    def reset_parameters(self) -> None:
        """W_V, W_K ~ N(0, 1/E), biases 0, norms 1, conv 0."""
        std = 1.0 / math.sqrt(self.d_mem)
        for proj in (self.value_proj, self.key_proj):
            if proj is not None:
                nn.init.normal_(proj.weight, 0.0, std)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)
        for module in (self.norm_q, self.norm_k, self.short_conv):
            if module is not None:
                module.reset_parameters()

    def _project(self, e_BTE: torch.Tensor) -> torch.Tensor:
        """[v, k_1..k_M] = [W_V; W_K] e (+ biases) in one matmul: [B, T, (M+1) D]."""
        projs = [p for p in (self.value_proj, self.key_proj) if p is not None]
        w = torch.cat([p.weight for p in projs], dim=0)
        b = torch.cat([p.bias for p in projs], dim=0) if self.value_proj.bias is not None else None
        e = e_BTE if torch.is_autocast_enabled(e_BTE.device.type) else e_BTE.to(w.dtype)  # bf16 tables
        return F.linear(e, w, b)

    def forward(
        self,
        h_BTMD: torch.Tensor,
        e_BTE: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        conv_state: ConvState | None = None,
        lengths: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (Y [B, T, M, D], gate alpha [B, T, M] in fp32); ``token_mask`` [B, T] bool, True = real."""
        B, T, M, D = h_BTMD.shape
        if M != self.n_branches or D != self.d_model:
            raise ValueError(f"hidden has {M} branches of width {D}, fusion expects {self.n_branches} x {self.d_model}")
        if token_mask is not None and tuple(token_mask.shape) != (B, T):
            raise ValueError(f"token_mask shape {tuple(token_mask.shape)} != hidden's [B, T] = {(B, T)}")
        vk = self._project(e_BTE)
        v_BTD = vk[..., :D]
        if self.use_gate:
            k_BTMD = vk[..., D:].reshape(B, T, M, D)
            s_BTM = (self.norm_q(h_BTMD) * self.norm_k(k_BTMD)).sum(-1) / math.sqrt(D)  # fp32
            if self.use_signed_sqrt:
                s_BTM = signed_sqrt(s_BTM)
            gate_BTM = torch.sigmoid(s_BTM)
        else:
            gate_BTM = torch.ones(B, T, M, device=h_BTMD.device)
        if token_mask is not None:
            gate_BTM = gate_BTM * token_mask.to(gate_BTM.device, gate_BTM.dtype).unsqueeze(-1)
        vt_BTMD = gate_BTM.unsqueeze(-1).to(v_BTD.dtype) * v_BTD.unsqueeze(2)
        if self.short_conv is not None:
            vt_BTMD = vt_BTMD + self.short_conv(vt_BTMD, segment_ids, conv_state, lengths)
            if token_mask is not None:  # the conv output at a masked position reads earlier tokens: drop it
                vt_BTMD = vt_BTMD * token_mask.to(vt_BTMD.device, vt_BTMD.dtype)[:, :, None, None]
        return vt_BTMD, gate_BTM


class EngramLayer(nn.Module):
    """One Engram layer: its memory table and its fusion. Consumes precomputed hash ids [B, T, H]."""

    def __init__(self, table: EngramTable, fusion: EngramFusion) -> None:
        super().__init__()
        if table.num_heads * table.d_head != fusion.d_mem:
            raise ValueError(f"table width {table.num_heads} x {table.d_head} != fusion d_mem {fusion.d_mem}")
        self.table = table
        self.fusion = fusion

    def reset_parameters(self) -> None:
        self.table.reset_parameters()
        self.fusion.reset_parameters()

    def retrieve(self, hash_ids_BTH: torch.Tensor) -> torch.Tensor:
        """e_t: [B, T, H] hash ids -> [B, T, E] concatenated rows."""
        return self.table(hash_ids_BTH).flatten(-2)

    def forward(
        self,
        h_BTMD: torch.Tensor,
        hash_ids_BTH: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        conv_state: ConvState | None = None,
        lengths: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        rows_BTHD: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Y [B, T, M, D], alpha [B, T, M]); hash ids of masked positions should hash as padding.
        ``rows_BTHD``: this layer's rows gathered ahead of time (by a prefetcher); None gathers them here."""
        e_BTE = rows_BTHD.flatten(-2) if rows_BTHD is not None else self.retrieve(hash_ids_BTH)
        return self.fusion(h_BTMD, e_BTE, segment_ids, conv_state, lengths, token_mask)
