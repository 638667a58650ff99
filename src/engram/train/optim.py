"""Optimisers as in the paper (SPEC section 4): the backbone on AdamW (or Muon), Engram tables on sparse Adam.

Groups (every trainable parameter lands in exactly one; ``build_optimizers`` asserts it):

=====================  ===================  ===========  ==============================================
group                  optimiser            lr           weight decay
=====================  ===================  ===========  ==============================================
``backbone_decay``     AdamW                lr           ``weight_decay`` (matrices: ndim >= 2, not an
                                                         ``nn.Embedding`` weight)
``backbone_no_decay``  AdamW                lr           0 (norms, also per-branch [M, D] ones, biases,
                                                         any 1-D tensor, token embeddings, tied heads)
``backbone_muon``      Muon (opt-in)        lr           ``weight_decay`` (2-D hidden matrices)
``engram_tables``      ``SparseRowAdam``    lr * 5       0 (paper: Adam, lr x5, no decay)
=====================  ===================  ===========  ==============================================

Token embeddings get no decay: a row is touched only when its token occurs, and decaying every row every
step would shrink rare tokens toward zero for no modelling reason (the usual GPT practice). Engram tables
are exempt for the same reason, and because their update must stay sparse.

Every group carries ``base_lr``; a schedule calls ``set_lr_factor(f)`` which sets ``lr = base_lr * f`` on
all groups at once, so the x5 table ratio holds at every step.

``SparseRowAdam`` reads and writes only the rows present in a step's sparse gradient (what
``F.embedding(..., sparse=True)`` produces): its cost follows the rows touched, never the table size.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn

from engram.memory import trainable_table_parameters

TABLE_GROUP = "engram_tables"


def _closure_loss(closure: Callable[[], Any] | None) -> Any:
    """The ``torch.optim`` closure protocol: re-evaluate the loss with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


# ------------------------------------------------------------------------------------- sparse Adam


def coalesce_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse COO row gradient -> (unique sorted row ids (U,) int64, summed rows (U, *row_shape) fp32).

    Duplicate rows (one per lookup) are summed with ``torch.unique`` + ``index_add_`` into a compact
    (U, D) buffer: on CPU this measured ~1.1 ms for 32k lookups x 32 wide, against 1-20 ms for
    ``Tensor.coalesce()`` (whose cost also varied with the table size). ``index_add_`` is only ever used
    into the compact buffer: into the full table it is O(table) on CPU.
    """
    if grad.sparse_dim() != 1:
        raise ValueError(f"expected a row-sparse gradient (sparse_dim 1), got sparse_dim {grad.sparse_dim()}")
    idx, vals = grad._indices()[0], grad._values()
    if grad.is_coalesced():
        return idx, vals.float()
    rows, inv = torch.unique(idx, sorted=True, return_inverse=True)
    summed = torch.zeros((rows.numel(), *vals.shape[1:]), dtype=torch.float32, device=vals.device)
    summed.index_add_(0, inv, vals.float())
    return rows, summed


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale all gradients (dense and row-sparse) so their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping (fp32 scalar). A sparse gradient is first reduced to unique rows
    (the norm of an uncoalesced gradient would count duplicate rows apart) and stored back coalesced, so
    ``SparseRowAdam`` skips its own reduction afterwards.
    """
    grads = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            if not p.grad.is_coalesced():
                rows, summed = coalesce_rows(p.grad)
                p.grad = torch.sparse_coo_tensor(rows[None], summed, p.shape, is_coalesced=True, check_invariants=False)
            grads.append(p.grad._values())
        else:
            grads.append(p.grad)
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


CLIP_MODES = ("per_group", "global", "backbone")


def _coalesced_values(p: torch.Tensor) -> torch.Tensor:
    """The gradient's values with duplicate rows summed (a sparse gradient is stored back coalesced)."""
    if p.grad.is_sparse:
        if not p.grad.is_coalesced():
            rows, summed = coalesce_rows(p.grad)
            p.grad = torch.sparse_coo_tensor(rows[None], summed, p.shape, is_coalesced=True, check_invariants=False)
        return p.grad._values()
    return p.grad


@torch.no_grad()
def clip_grad_groups_(
    backbone: Iterable[torch.Tensor],
    tables: Iterable[torch.Tensor],
    max_norm: float,
    mode: str = "per_group",
    sum_over_shards: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, float]:
    """Clip the backbone's dense gradients and the tables' row-sparse ones; returns their norms before
    clipping (backbone, tables). ``max_norm`` 0 only measures.

    Modes: "per_group" scales each group by min(1, max_norm / its own norm): a table row's gradient no
    longer shrinks backbone steps (a global norm would, and differently in an Engram run than in its MoE
    baseline). "global" scales both by one norm over all of them. "backbone" clips the backbone alone and
    leaves the tables to Adam's normalisation (the behaviour before groups existed).

    The backbone norm is ``torch.nn.utils.clip_grad_norm_``'s over the dense gradients (after DDP they are
    the same on every rank). The table norm counts each touched row once (duplicates summed), over all
    shards: ``sum_over_shards`` sums this rank's squared norm over the ranks holding the other rows.
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"gradient clipping mode must be one of {CLIP_MODES}, got {mode!r}")
    dense = [p for p in backbone if p.grad is not None and not p.grad.is_sparse]
    rows = [_coalesced_values(p) for p in tables if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32)
    for g in rows:
        sq += torch.linalg.vector_norm(g.float()).cpu() ** 2
    if sum_over_shards is not None:
        sq = sum_over_shards(sq)
    table_norm = float(sq.sqrt())
    if mode == "global":
        bb = torch.nn.utils.get_total_norm([p.grad for p in dense]).cpu() if dense else torch.zeros(())
        total = math.sqrt(float(bb) ** 2 + table_norm**2)
        if max_norm > 0 and total > 0:
            coef = min(1.0, max_norm / (total + 1e-6))
            for g in [p.grad for p in dense] + rows:
                g.mul_(coef)
        return float(bb), table_norm
    if not dense:
        bb_norm = 0.0
    elif max_norm > 0:
        bb_norm = float(torch.nn.utils.clip_grad_norm_(dense, max_norm))
    else:
        bb_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in dense])))
    if mode == "per_group" and max_norm > 0 and rows:
        coef = min(1.0, max_norm / (table_norm + 1e-6))
        if coef < 1.0:
            for g in rows:
                g.mul_(coef)
    return bb_norm, table_norm


class SparseRowAdam(torch.optim.Optimizer):
    """Lazy Adam for row-sparse gradients; only rows touched in a step are read and written.

    Per touched row r with summed gradient g_r (the update is ``torch.optim.Adam``'s, restricted to r)::

        m_r <- b1 m_r + (1 - b1) g_r          v_r <- b2 v_r + (1 - b2) g_r^2
        p_r <- p_r - lr / bc1 * m_r / (sqrt(v_r) / sqrt(bc2) + eps)

    Untouched rows keep p, m and v unchanged (no decay of their moments: "lazy" Adam).

    ``bias_correction``:
      * ``"global"`` (default): bc_i = 1 - b_i^t with t the optimiser's step count, the semantics of
        ``torch.optim.SparseAdam``. State: ``step`` (int), ``exp_avg``, ``exp_avg_sq``.
      * ``"per_row"``: t is the number of steps that touched the row, so a row's trajectory equals dense
        Adam run on only the steps that touched it (a row first seen late is not over-stepped). Adds a
        ``row_step`` int32 tensor (one entry per row) to the state.

    State ``exp_avg`` / ``exp_avg_sq`` are dense fp32 tensors of the parameter's shape, whatever the
    parameter dtype; a bf16 table is updated in fp32 and rounded to nearest once per touched row.

    Dense gradients: the parameter is updated as if every row was touched (exactly dense Adam, at dense
    cost), with a one-time warning, since a dense table gradient usually means ``sparse=True`` was
    forgotten. ``dense_grad="error"`` raises instead.

    Determinism: on CPU the row reduction (``index_add_``) is deterministic; on CUDA it uses atomics.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        bias_correction: Literal["global", "per_row"] = "global",
        dense_grad: Literal["fallback", "error"] = "fallback",
    ) -> None:
        if lr < 0 or eps < 0:
            raise ValueError(f"SparseRowAdam: lr and eps must be >= 0, got lr={lr}, eps={eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"SparseRowAdam: betas must be in [0, 1), got {betas}")
        if bias_correction not in ("global", "per_row"):
            raise ValueError(f"SparseRowAdam: bias_correction must be 'global' or 'per_row', got {bias_correction!r}")
        if dense_grad not in ("fallback", "error"):
            raise ValueError(f"SparseRowAdam: dense_grad must be 'fallback' or 'error', got {dense_grad!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, bias_correction=bias_correction, dense_grad=dense_grad)
        super().__init__(params, defaults)
        self._dense_warned: set[int] = set()
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 1:
                    raise ValueError("SparseRowAdam: parameters must have a row dimension (ndim >= 1)")

    def _init_state(self, p: torch.Tensor, per_row: bool) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        if per_row and "row_step" not in state:
            state["row_step"] = torch.zeros(p.shape[0], dtype=torch.int32, device=p.device)
        return state

    def _rows_and_grad(self, p: torch.Tensor, group: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        grad = p.grad
        if grad.is_sparse:
            return coalesce_rows(grad)
        if group["dense_grad"] == "error":
            raise RuntimeError(
                "SparseRowAdam got a dense gradient; build the table lookup with sparse=True "
                "(F.embedding(..., sparse=True)) or pass dense_grad='fallback'"
            )
        if id(p) not in self._dense_warned:
            warnings.warn(
                "SparseRowAdam: dense gradient for a table; updating every row (dense Adam cost). "
                "Use sparse=True lookups for row-sparse updates.",
                stacklevel=3,
            )
            self._dense_warned.add(id(p))
        return torch.arange(p.shape[0], device=p.device), grad.float()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            per_row = group["bias_correction"] == "per_row"
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, g = self._rows_and_grad(p, group)  # (U,), (U, *row) fp32
                state = self._init_state(p, per_row)
                state["step"] += 1
                m = state["exp_avg"].index_select(0, rows)
                v = state["exp_avg_sq"].index_select(0, rows)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p_rows = p.detach().index_select(0, rows).float()
                if per_row:
                    t = state["row_step"].index_select(0, rows) + 1  # (U,) int32
                    state["row_step"].index_copy_(0, rows, t)
                    t = t.to(torch.float64).view(-1, *([1] * (p.ndim - 1)))
                    bc1 = (1 - b1**t).float()
                    bc2_sqrt = (1 - b2**t).sqrt().float()
                    denom = v.sqrt().div_(bc2_sqrt).add_(eps)
                    p_rows.sub_(m / denom * (lr / bc1))
                else:
                    t = state["step"]
                    bc1, bc2 = 1 - b1**t, 1 - b2**t
                    denom = v.sqrt().div_(math.sqrt(bc2)).add_(eps)
                    p_rows.addcdiv_(m, denom, value=-lr / bc1)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                p.detach().index_copy_(0, rows, p_rows.to(p.dtype))
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``, but every state tensor keeps its saved dtype.

        (The base class casts tensor state to the parameter's dtype, which would round the fp32 moments of a
        bf16 table to bf16 and turn the int32 ``row_step`` into floats.)
        """
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, p in enumerate(params):
            if idx in saved and p in self.state:
                for key, value in saved[idx].items():
                    if isinstance(value, torch.Tensor):  # fp32 moments, int32 row steps: keep saved dtype
                        self.state[p][key] = value.to(device=p.device, copy=True)


# --------------------------------------------------------------------------------------------- Muon


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate the nearest semi-orthogonal matrix U V^T of a 2-D ``g`` by a quintic Newton-Schulz.

    The odd polynomial p(x) = a x + b x^3 + c x^5, (a, b, c) = (3.4445, -4.7750, 2.0315), applied to the
    spectrally normalised matrix pushes every singular value into roughly [0.7, 1.2] in five steps
    (the coefficients trade exact convergence for speed; Muon does not need exact orthogonality).
    Runs in ``g``'s dtype; iterate on the short side (k x k Gram matrix, k = min(rows, cols)).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)  # Frobenius norm >= spectral norm, so singular values start <= 1
    for _ in range(steps):
        gram = x @ x.T  # (k, k)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices: Nesterov momentum, then Newton-Schulz orthogonalisation of the update.

    ``p <- p (1 - lr wd) - lr * 0.2 sqrt(max(rows, cols)) * orthogonalize(g + mu m)`` with
    ``m <- mu m + g``. The 0.2 sqrt(max dim) factor matches the update RMS of AdamW (about 0.2), so the
    AdamW learning rate and weight decay carry over (the paper's Muon lr 4e-4, wd 0.1).
    ``ns_dtype`` is the Newton-Schulz compute dtype (bf16 halves its cost; fp32 by default on CPU tests).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 4e-4,
        momentum: float = 0.95,
        weight_decay: float = 0.1,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float32,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or ns_steps < 1:
            raise ValueError(f"Muon: bad hyper-parameters lr={lr} wd={weight_decay} momentum={momentum} ns={ns_steps}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only updates 2-D matrices, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Muon does not take sparse gradients")
                g = p.grad.float()
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(g)
                update = orthogonalize(g.add(buf, alpha=mu).to(self.ns_dtype), group["ns_steps"]).float()
                scale = 0.2 * math.sqrt(max(p.shape))
                p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr * scale)
        return loss


# --------------------------------------------------------------------------------- combined optimiser


class EngramOptimizer:
    """Several ``torch.optim`` optimisers stepped as one; the training loop sees a single object.

    ``param_groups`` lists every group of every member (each has ``name``, ``lr`` and ``base_lr``).
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = dict(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global-norm clipping over every group's gradients (sparse-aware); returns the pre-clip norm."""
        return clip_grad_norm_([p for g in self.param_groups for p in g["params"]], max_norm)

    def set_lr_factor(self, factor: float) -> None:
        """Set ``lr = base_lr * factor`` on every group (keeps the table / backbone ratio)."""
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * factor

    def lrs(self) -> dict[str, float]:
        """Current learning rate per group name."""
        return {g["name"]: g["lr"] for g in self.param_groups}

    def state_dict(self, without: Iterable[torch.Tensor] = ()) -> dict[str, Any]:
        """Every member's state dict; the per-parameter state of ``without`` (tables whose moments a
        checkpoint stores beside their rows) is left out."""
        skip = {id(p) for p in without}
        out = {}
        for k, opt in self.optimizers.items():
            sd = opt.state_dict()
            params = [p for g in opt.param_groups for p in g["params"]]
            sd["state"] = {i: st for i, st in sd["state"].items() if id(params[i]) not in skip}
            out[k] = sd
        return {"optimizers": out}

    def param_state(self, p: torch.Tensor) -> dict[str, Any]:
        """The state one parameter has in whichever member optimizes it ({} before its first step)."""
        for opt in self.optimizers.values():
            if any(q is p for g in opt.param_groups for q in g["params"]):
                return dict(opt.state.get(p, {}))
        raise KeyError("parameter is not optimized by this EngramOptimizer")

    def load_param_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """Restore one parameter's state (tensors moved to the parameter's device, dtypes kept)."""
        for opt in self.optimizers.values():
            if any(q is p for g in opt.param_groups for q in g["params"]):
                opt.state[p] = {k: v.to(p.device, copy=True) if isinstance(v, torch.Tensor) else v
                                for k, v in state.items()}
                return
        raise KeyError("parameter is not optimized by this EngramOptimizer")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["optimizers"]
        if set(saved) != set(self.optimizers):
            raise ValueError(f"optimizer state has members {sorted(saved)}, expected {sorted(self.optimizers)}")
        for k, opt in self.optimizers.items():
            ours = [g["name"] for g in opt.param_groups]
            theirs = [g.get("name") for g in saved[k]["param_groups"]]
            if ours != theirs:
                raise ValueError(f"optimizer {k!r}: saved groups {theirs} != current groups {ours}")
            opt.load_state_dict(saved[k])

    def __repr__(self) -> str:
        parts = [f"{g['name']}: {len(g['params'])} tensors, lr={g['lr']:.3g}" for g in self.param_groups]
        return "EngramOptimizer(" + "; ".join(parts) + ")"


def _default_adamw_only(name: str, p: torch.Tensor) -> bool:
    return "lm_head" in name


def build_optimizers(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    table_lr_mult: float = 5.0,
    *,
    eps: float = 1e-8,
    table_betas: tuple[float, float] | None = None,
    table_bias_correction: Literal["global", "per_row"] = "global",
    backbone: Literal["adamw", "muon"] = "adamw",
    adamw_only: Callable[[str, torch.Tensor], bool] = _default_adamw_only,
    table_params: Iterable[torch.Tensor] | None = None,
) -> EngramOptimizer:
    """The paper's split: backbone AdamW (or Muon) at ``lr``, Engram tables ``SparseRowAdam`` at lr x5, wd 0.

    Tables are ``table_params`` if given, else the rows of ``model.memory_tables()`` (a table on a
    read-only tier is refused by name), else none. With ``backbone="muon"``, 2-D matrices that are neither embeddings nor ``adamw_only``
    (default: names containing ``lm_head``) go to Muon; the rest stay on AdamW.
    Raises ``ValueError`` naming any trainable parameter that would land in no group or in two.
    """
    if backbone not in ("adamw", "muon"):
        raise ValueError(f"backbone must be 'adamw' or 'muon', got {backbone!r}")
    if table_params is None:
        table_params = trainable_table_parameters(model)
    table_params = [p for p in table_params if p.requires_grad]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    name_of = {id(p): n for n, p in named}
    stray = [p for p in table_params if id(p) not in name_of]
    if stray:
        raise ValueError(f"{len(stray)} table parameter(s) are not trainable parameters of the model")
    table_ids = {id(p) for p in table_params}
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # norm gains are scales, not matrices, even when stacked per branch ([M, D]); mHC biases likewise
    no_decay_ids = {id(q) for m in model.modules() if "Norm" in type(m).__name__ for q in m.parameters(recurse=False)}
    no_decay_ids |= {id(q) for n, q in named if n.rsplit(".", 1)[-1].startswith("bias")}

    decay, no_decay, muon = [], [], []
    for n, p in named:
        if id(p) in table_ids:
            continue
        is_matrix = p.ndim >= 2 and id(p) not in embedding_ids and id(p) not in no_decay_ids
        if backbone == "muon" and is_matrix and p.ndim == 2 and not adamw_only(n, p):
            muon.append(p)
        elif is_matrix:
            decay.append(p)
        else:
            no_decay.append(p)

    groups = {"backbone_decay": decay, "backbone_no_decay": no_decay, "backbone_muon": muon, TABLE_GROUP: table_params}
    _check_partition(named, groups)

    adamw_groups = [
        dict(params=decay, name="backbone_decay", weight_decay=weight_decay, lr=lr, base_lr=lr),
        dict(params=no_decay, name="backbone_no_decay", weight_decay=0.0, lr=lr, base_lr=lr),
    ]
    adamw_groups = [g for g in adamw_groups if g["params"]]
    optimizers: dict[str, torch.optim.Optimizer] = {}
    if adamw_groups:
        optimizers["adamw"] = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps)
    if muon:
        optimizers["muon"] = Muon(
            [dict(params=muon, name="backbone_muon", lr=lr, base_lr=lr)], lr=lr, weight_decay=weight_decay
        )
    if table_params:
        t_lr = lr * table_lr_mult
        optimizers["tables"] = SparseRowAdam(
            [dict(params=table_params, name=TABLE_GROUP, lr=t_lr, base_lr=t_lr)],
            lr=t_lr,
            betas=table_betas if table_betas is not None else betas,
            eps=eps,
            bias_correction=table_bias_correction,
        )
    return EngramOptimizer(optimizers)


def _check_partition(named: list[tuple[str, torch.Tensor]], groups: dict[str, list[torch.Tensor]]) -> None:
    """Every trainable parameter in exactly one group, or a ValueError naming the offenders."""
    seen: dict[int, list[str]] = {}
    for gname, params in groups.items():
        for p in params:
            seen.setdefault(id(p), []).append(gname)
    missing = [n for n, p in named if id(p) not in seen]
    dup = [f"{n} (in {', '.join(seen[id(p)])})" for n, p in named if len(seen.get(id(p), [])) > 1]
    if missing or dup:
        raise ValueError(
            "optimizer groups do not partition the parameters: "
            f"in no group: {', '.join(missing) or '-'}; in several: {', '.join(dup) or '-'}"
        )


__all__ = [
    "TABLE_GROUP",
    "coalesce_rows",
    "clip_grad_norm_",
    "clip_grad_groups_",
    "CLIP_MODES",
    "SparseRowAdam",
    "orthogonalize",
    "Muon",
    "EngramOptimizer",
    "build_optimizers",
]
