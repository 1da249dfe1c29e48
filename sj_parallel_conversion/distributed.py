"""Distributed calibration and evaluation on ``torch.distributed`` (gloo on CPU, gloo + NCCL on GPU).

Each rank calibrates on its own shard of the calibration data; every per-channel statistic
(running maxima, the pre/post errors of Algorithm 1) is all-reduced before it is used, so all
ranks hold identical parameters, equal to a single-process run whose batches are the union of
the ranks' batches (up to floating-point reduction order). Evaluation shards the test set and
sums the counts. Launch with ``torchrun --nproc_per_node=N``; see the docs for the command line.

Every collective here takes a tensor on any device: :func:`all_reduce` moves it to a device the
group's backend serves (NCCL reduces only CUDA tensors, gloo CPU ones) and the result back, so
callers may keep statistics on the CPU under NCCL.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "shutdown", "process_group", "backend_for", "device_from_env", "is_distributed",
           "rank", "world_size", "collective_device", "all_reduce", "allreduce_reducer", "shard_indices",
           "distributed_evaluate"]

DeviceLike = Union[str, torch.device, None]
OPS = ("sum", "max")

# Whether init_from_env created the default group, and so is the one to destroy it.
_owns_group = False


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def device_from_env(device: DeviceLike = None) -> torch.device:
    """The device this process computes on under torchrun.

    ``device`` given: that device, a CUDA one without index meaning ``cuda:LOCAL_RANK``. Not
    given: ``cuda:LOCAL_RANK`` where CUDA has that many devices, else the CPU.
    """
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        cuda = torch.cuda.is_available() and local < torch.cuda.device_count()
        return torch.device("cuda", local) if cuda else torch.device("cpu")
    dev = torch.device(device)
    return torch.device("cuda", local) if dev.type == "cuda" and dev.index is None else dev


def backend_for(device: DeviceLike) -> str:
    """The process-group backend for a run on ``device``: gloo on the CPU; on CUDA gloo for CPU
    tensors and NCCL for CUDA ones (``"cpu:gloo,cuda:nccl"``), since calibration keeps some
    statistics on the CPU whatever the device."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(backend: Optional[str] = None, device: DeviceLike = None) -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1).

    Returns True when running distributed. The backend is :func:`backend_for` the device in
    use (:func:`device_from_env` of ``device``) unless ``backend`` names one. On CUDA the process
    selects its GPU before the group exists, so that NCCL binds its communicator to that GPU.
    The group this call creates is destroyed by :func:`shutdown`, which also runs at exit (the
    command line relies on that); :func:`process_group` scopes it to a ``with`` block.
    """
    global _owns_group
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dev = device_from_env(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend or backend_for(dev))
        _owns_group = True
        atexit.register(shutdown)
    return True


def shutdown() -> None:
    """Destroy the process group :func:`init_from_env` created (no-op otherwise, or twice)."""
    global _owns_group
    if _owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _owns_group = False


@contextlib.contextmanager
def process_group(backend: Optional[str] = None, device: DeviceLike = None) -> Iterator[bool]:
    """:func:`init_from_env` for a ``with`` block: yields whether the run is distributed and
    destroys the group on leaving the block if the block created it."""
    created = not (dist.is_available() and dist.is_initialized())
    joined = init_from_env(backend, device)
    try:
        yield joined
    finally:
        if joined and created:
            shutdown()


def _current_cuda_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def collective_device(device: DeviceLike, group=None) -> torch.device:
    """The device on which ``group`` reduces a tensor that lives on ``device``: that device when
    the group's backend serves its type (gloo: CPU, NCCL: CUDA, a ``cpu:gloo,cuda:nccl`` group:
    both), else this process's current GPU for an NCCL-only group, or the CPU."""
    dev = torch.device(device)
    config = dist.get_backend_config(group)  # e.g. "cpu:gloo,cuda:nccl"
    served = {part.split(":")[0].strip() for part in config.split(",") if ":" in part}
    if dev.type in served:
        return dev
    return _current_cuda_device() if "cuda" in served else torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """``t`` reduced over ``group`` (``op``: ``"sum"`` or ``"max"``) as a new tensor on ``t``'s
    device; the reduction itself runs on :func:`collective_device`. ``t`` is not modified."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    where = collective_device(t.device, group)
    work = t.detach().to(where, copy=True).contiguous()
    dist.all_reduce(work, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return work if work.device == t.device else work.to(t.device)


def allreduce_reducer(group=None) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """A ``reducer(tensor, op)`` for :class:`~sj_parallel_conversion.ParallelConversionRecipe`.

    ``op`` is ``"sum"`` (per-channel sums and counts) or ``"max"`` (running maxima). Tensors may
    live on any device (:func:`all_reduce`); outside a process group they pass through.
    """
    def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
        if not is_distributed():
            return t
        return all_reduce(t, op, group)

    return reduce


def shard_indices(n: int, rank_: Optional[int] = None, world: Optional[int] = None) -> Sequence[int]:
    """Contiguous, equally sized shard of ``range(n)`` for this rank (the remainder is dropped so
    that every rank runs the same number of steps, which collective reductions need)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    per = n // w
    if per == 0:
        raise ValueError(f"cannot shard {n} items over {w} processes")
    return range(r * per, (r + 1) * per)


@torch.no_grad()
def distributed_evaluate(predict: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device="cpu",
                         num_batches: Optional[int] = None, progress: bool = False):
    """:func:`~sj_parallel_conversion.inference.evaluate` on this rank's shard, counts summed over ranks.

    Returns ``(accuracy, images, seconds)`` with images summed and seconds maximised over ranks.
    """
    from .inference import evaluate

    acc, n, sec = evaluate(predict, loader, device=device, num_batches=num_batches, progress=progress)
    if not is_distributed():
        return acc, n, sec
    counts = all_reduce(torch.tensor([acc * n, float(n)], dtype=torch.float64), "sum")
    t = all_reduce(torch.tensor([sec], dtype=torch.float64), "max")
    return float(counts[0] / counts[1]), int(counts[1]), float(t[0])
