"""Thin helpers over ``torch.distributed`` that also work without a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    return get_rank() == 0


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0 (no gradient flows back).

    [N, ...] on each of W processes -> [W*N, ...]; identity without a process group.
    """
    if get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def block_shard(n: int, block: int) -> list[int]:
    """This rank's share of ``range(n)`` cut into blocks of ``block`` indices: the blocks
    r, r + W, r + 2W, ... of rank r among W processes, in order.

    The shares are disjoint, cover ``range(n)`` and differ in size by at most ``block``. With
    ``block`` = a loader's batch size, rank r gets exactly the batches r, r + W, ... of the
    one-process in-order loader. All of ``range(n)`` without a process group.
    """
    w, r = get_world_size(), get_rank()
    return [i for s in range(r * block, n, w * block) for i in range(s, min(s + block, n))]


def _collective_device() -> torch.device:
    """Where the process group's tensors must be: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def all_gather_rows(x: torch.Tensor, chunk: int = 1 << 14) -> torch.Tensor:
    """Every rank's rows, rank 0's first: [n_r, ...] on rank r -> [n_0 + ... + n_{W-1}, ...] on
    every rank, on ``x``'s device; the n_r may differ. Identity without a process group.

    ``all_gather`` needs the same shape on every rank, so the shapes go round first (a rank with
    n_r = 0 may pass any trailing shape; the dtype must agree), then the rows in pieces of at most
    ``chunk`` rows, each rank's piece zero-padded to the longest rank's; the padding is dropped on
    arrival. At most W * ``chunk`` rows are in flight, on the backend's device (CUDA for NCCL).
    Collective: every rank calls it.
    """
    if get_world_size() == 1:
        return x
    shapes = all_gather_object(tuple(x.shape))
    counts = [s[0] for s in shapes]
    tail = next((s[1:] for s in shapes if s[0]), tuple(x.shape[1:]))
    x = x.reshape(counts[get_rank()], *tail)
    comm, got = _collective_device(), []  # got[j][r]: rank r's rows of piece j
    for start in range(0, max(counts), chunk):
        rows = min(chunk, max(counts) - start)
        piece = x.new_zeros((rows, *tail), device=comm)  # [rows, ...], this rank's rows first
        mine = x[start:start + rows]
        piece[:len(mine)] = mine
        parts = [torch.empty_like(piece) for _ in counts]
        dist.all_gather(parts, piece)
        got.append([p[:max(0, min(rows, n - start))].to(x.device)
                    for p, n in zip(parts, counts, strict=True)])
    if not got:
        return x
    return torch.cat([g[r] for r in range(len(counts)) for g in got])


@torch.no_grad()
def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from ``src``; no-op without a process group."""
    if get_world_size() > 1:
        dist.broadcast(x, src)
    return x


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` without a process group."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_across_ranks(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item())


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model
