"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE) with grouped expert weights.

Runs in the scheduler process inside a decoder layer: hidden [T, H] -> [T, H]. A replicated
router scores the experts per token; each token goes to its `top_k` experts, weighted:
softmax over all experts in fp32, the top k kept, then (`renormalize`) divided by their sum,
which equals a softmax over the top-k logits (Mixtral always; Qwen3-MoE when
`norm_topk_prob`). Expert e computes down(act(gate(x)) * up(x)).

Weights are grouped over experts: `experts.gate_up_proj` [E, 2 * I, H] (gate rows then up rows)
and `experts.down_proj` [E, H, I], the layout of HF transformers 5. Checkpoints store either
that layout or one tensor per expert and projection (`experts.{e}.gate_proj` ...); both load
(`GroupedExperts.weight_loader` with shard ids "{e}.gate", "{e}.up", "{e}.down", or None for
a grouped tensor).

Tensor parallel: every rank holds every expert, sliced along the intermediate dim (gate/up rows,
down columns); the partial sums are all-reduced, like a row-parallel linear.

The computation is the grouped torch path on every device: tokens sorted by expert, one matmul
pair per expert that has tokens, the weighted results summed back per token in expert order
(the order HF adds them, so fp32 results agree). Its per-expert token counts are read on the
host, which a CUDA graph cannot capture; while a decode graph is being captured the layer runs
every expert on every token instead (`dense`), weighting the unchosen ones by zero: the same
sum, fixed shapes, and at decode batch sizes the expert weights are read once either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from srt.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from srt.layers.activation import gated_activation
from srt.layers.linear import Linear


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        tp = get_tp_size()
        if intermediate_size % tp:
            raise ValueError(
                f"expert intermediate size {intermediate_size} is not divisible by --tp-size {tp}"
            )
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.per_rank = intermediate_size // tp
        self.tp_rank = get_tp_rank()
        n = self.per_rank
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * n, hidden_size), requires_grad=False
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, n), requires_grad=False)
        experts = range(num_experts)
        self.gate_up_proj.shard_ids = tuple(f"{e}.{p}" for e in experts for p in ("gate", "up"))
        self.down_proj.shard_ids = tuple(f"{e}.down" for e in experts)
        for p in (self.gate_up_proj, self.down_proj):
            p.weight_loader = self.weight_loader

    def _rank_slice(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.narrow(dim, self.tp_rank * self.per_rank, self.per_rank)

    def weight_loader(
        self, param: torch.Tensor, loaded: torch.Tensor, shard_id: str | None = None
    ) -> None:
        """Copies this rank's slice of one expert's projection (`shard_id` "{e}.gate" /
        "{e}.up" / "{e}.down", an [I, H] or [H, I] tensor) or of all experts' grouped tensor
        (`shard_id` None)."""
        E, H, inter = self.num_experts, self.hidden_size, self.intermediate_size
        is_down = param is self.down_proj
        if shard_id is None:
            want = (E, H, inter) if is_down else (E, 2 * inter, H)
            if tuple(loaded.shape) != want:
                raise ValueError(f"grouped expert weight {tuple(loaded.shape)} is not {want}")
            if is_down:
                param.data.copy_(self._rank_slice(loaded, 2))
            else:
                gate, up = loaded.split(inter, dim=1)
                n = self.per_rank
                param.data[:, :n].copy_(self._rank_slice(gate, 1))
                param.data[:, n:].copy_(self._rank_slice(up, 1))
            return
        expert, proj = shard_id.split(".")
        e = int(expert)
        want = (H, inter) if proj == "down" else (inter, H)
        if tuple(loaded.shape) != want:
            raise ValueError(f"expert {e} {proj} weight {tuple(loaded.shape)} is not {want}")
        if proj == "down":
            param.data[e].copy_(self._rank_slice(loaded, 1))
        else:
            offset = 0 if proj == "gate" else self.per_rank
            param.data[e, offset : offset + self.per_rank].copy_(self._rank_slice(loaded, 0))


class SparseMoE(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        hidden_act: str = "silu",
    ) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"{top_k} experts per token out of {num_experts}")
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = Linear(hidden_size, num_experts)  # the router, on every rank
        self.experts = GroupedExperts(num_experts, hidden_size, intermediate_size)
        self.act_fn = gated_activation(hidden_act)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] in x's dtype, expert ids [T, k]) of each token."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return tp_all_reduce(self.dense(x, weights, ids))
        return tp_all_reduce(self.grouped(x, weights, ids))

    def dense(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, summed with the routing weights (zero off the top k):
        no data-dependent shapes. This rank's partial sum."""
        route = torch.zeros(x.shape[0], self.experts.num_experts, dtype=x.dtype, device=x.device)
        route.scatter_(1, ids, weights)
        w13, w2 = self.experts.gate_up_proj, self.experts.down_proj
        h = self.act_fn(torch.einsum("th,eoh->eto", x, w13).contiguous())  # [E, T, I]
        y = torch.einsum("eti,ehi->eth", h, w2)  # [E, T, H]
        return torch.einsum("eth,te->th", y, route)

    def grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each expert on its own tokens only (the counts read on the host). This rank's
        partial sum."""
        flat = ids.view(-1)
        # Token-expert pairs sorted by expert (stable: tokens keep their order within one).
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.experts.num_experts).tolist()
        token_of = order // self.top_k
        xs = x.index_select(0, token_of)
        ys = torch.empty_like(xs)
        w13, w2 = self.experts.gate_up_proj, self.experts.down_proj
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                ys[rows] = F.linear(self.act_fn(F.linear(xs[rows], w13[e])), w2[e])
                start += n
        # NOTE: weighted and summed in fp32, rounded once (as `dense`'s einsum does): in bf16,
        # each product and each of the top-k adds rounded on its own.
        ys = ys.float() * weights.view(-1).index_select(0, order).unsqueeze(-1).float()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return out.index_add_(0, token_of, ys).to(x.dtype)
