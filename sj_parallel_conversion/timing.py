"""Clock reads that measure device work, not its launch.

CUDA kernels run asynchronously: a call returns once its work is queued, so a clock read right
after it measures the launch. Every timing in the package and its benchmarks waits for the
device with :func:`synchronize` before reading the clock.
"""
from __future__ import annotations

import time
from typing import Callable, Union

import torch

__all__ = ["synchronize", "timed"]

DeviceLike = Union[str, torch.device, None]


def synchronize(device: DeviceLike = None) -> None:
    """Wait until the work queued on ``device`` (a CUDA device) has finished.

    With ``device=None`` or a non-CUDA device it waits for the current CUDA device when this
    process has used CUDA (a model on the GPU fed from CPU batches), and otherwise returns at
    once: on a CPU-only run it costs nothing.
    """
    if not torch.cuda.is_initialized():
        return
    dev = torch.device(device) if device is not None else None
    torch.cuda.synchronize(dev if dev is not None and dev.type == "cuda" else None)


def timed(fn: Callable[[], object], device: DeviceLike = None) -> float:
    """Seconds that ``fn()`` takes, with the device synchronised before and after.

    On a CUDA ``device`` the time is read from CUDA events recorded around the call (the host's
    clock would add the synchronisation's own latency, tens of microseconds, to kernels that
    take about as long); elsewhere from :func:`time.perf_counter`.
    """
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        synchronize(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0

