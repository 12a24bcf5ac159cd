"""Process groups of one data-parallel replica: tensor parallel (tp) x pipeline parallel (pp).

A replica runs `tp_size * pp_size` scheduler ranks, one process each (on several nodes when
--nnodes > 1). Rank `r` is TP rank `r % tp_size` of pipeline stage `r // tp_size`, so the ranks
of a stage are contiguous. Groups are torch.distributed groups, not a layer of our own:

- the device group of each stage's TP ranks (NCCL on GPU, gloo on CPU): all-reduce after
  row-parallel layers and the vocab-parallel embedding, all-gather of the lm_head's logits;
- the device world group: point-to-point hidden states between pipeline stages, logits back;
- a gloo world group on the CPU: rank 0 broadcasts each step's plan (bytes) to all ranks.

Without `init_parallel` (one rank) every collective here is the identity, so the models run
unchanged in a single process and in tests that build them directly.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# NOTE: idle ranks wait in a broadcast until rank 0 plans a step, which may be days away; the
# watchdog of the main process (or a closed TCP connection) is what ends them, not a timeout.
_WAIT_FOREVER = datetime.timedelta(days=365)


@dataclass
class ParallelState:
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    tp_group: Any = None  # device group of this stage's TP ranks
    world_group: Any = None  # device group of every rank (pipeline send/recv)
    cpu_group: Any = None  # gloo group of every rank (step broadcast)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp_rank: int, tp_rank: int | None = None) -> int:
        """Global rank of TP rank `tp_rank` (default: ours) of stage `pp_rank`."""
        return pp_rank * self.tp_size + (self.tp_rank if tp_rank is None else tp_rank)


_STATE = ParallelState()


def get_parallel_state() -> ParallelState:
    return _STATE


def get_tp_size() -> int:
    return _STATE.tp_size


def get_tp_rank() -> int:
    return _STATE.tp_rank


def init_parallel(
    tp_size: int, pp_size: int, rank: int, init_addr: str, device: torch.device
) -> ParallelState:
    """Joins the replica's ranks at `init_addr` (HOST:PORT; rank 0 hosts the store) and builds
    the groups. Blocks until every rank has joined."""
    global _STATE
    world = tp_size * pp_size
    backend = "nccl" if device.type == "cuda" else "gloo"
    logger.info("rank %d/%d joining %s (%s)", rank, world, init_addr, backend)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{init_addr}",
        world_size=world,
        rank=rank,
        timeout=_WAIT_FOREVER,
        device_id=device if device.type == "cuda" else None,
    )
    state = ParallelState(tp_size=tp_size, tp_rank=rank % tp_size, pp_size=pp_size)
    state.pp_rank = rank // tp_size
    # NOTE: every rank must create every group, in the same order.
    for stage in range(pp_size):
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(ranks, backend=backend, timeout=_WAIT_FOREVER)
        if stage == state.pp_rank:
            state.tp_group = group
    state.world_group = dist.group.WORLD
    state.cpu_group = (
        dist.new_group(list(range(world)), backend="gloo", timeout=_WAIT_FOREVER)
        if backend != "gloo"
        else dist.group.WORLD
    )
    _STATE = state
    return state


def destroy_parallel() -> None:
    """Leaves the process groups (in-process use; a rank process just exits)."""
    global _STATE
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = ParallelState()


# ---- tensor parallel collectives ----------------------------------------------------------


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the stage's TP ranks (in place); identity without TP."""
    if _STATE.tp_size == 1:
        return x
    dist.all_reduce(x, group=_STATE.tp_group)
    return x


def tp_all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Concatenates every TP rank's `x` along the last dim, in rank order."""
    if _STATE.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=_STATE.tp_group)
    return torch.cat(parts, dim=-1)


# ---- step broadcast (CPU) ----------------------------------------------------------------


def broadcast_bytes(data: bytes | None) -> bytes:
    """Rank 0 passes its bytes, the others None; every rank returns rank 0's bytes."""
    group = _STATE.cpu_group
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    if data is not None:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(buf, src=0, group=group)
    return data if data is not None else buf.numpy().tobytes()


def cpu_all_reduce_min(value: int) -> int:
    """The smallest `value` over every rank (e.g. the KV pool size all ranks can hold)."""
    if _STATE.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_STATE.cpu_group)
    return int(t.item())


# ---- pipeline point-to-point -------------------------------------------------------------


def send_async(tensors: list[torch.Tensor], dst: int) -> list[Any]:
    """Starts sending `tensors` to global rank `dst`; returns the works to wait on."""
    return [dist.isend(t.contiguous(), dst=dst, group=_STATE.world_group) for t in tensors]


def recv(tensors: list[torch.Tensor], src: int) -> None:
    """Receives into `tensors` (preallocated, shapes agreed by both sides) from rank `src`."""
    works = [dist.irecv(t, src=src, group=_STATE.world_group) for t in tensors]
    for w in works:
        w.wait()
