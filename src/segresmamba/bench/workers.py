"""The one worker pool of the benchmark tools: jobs spread over devices, one job per device at a time.

Sweeps (one ``segresmamba fit`` process per run) and the efficiency profiler (one process per model and
dataset) both hand their jobs to :func:`run_on_devices`; each job gets a free device id, which it passes
to its process as ``CUDA_VISIBLE_DEVICES``, and gives the id back when it ends, so a long job never holds
up the others' devices (dynamic balancing, as ``torchrun``-less job queues do).
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

__all__ = ["run_on_devices", "threads_per_process", "device_env"]

Job = TypeVar("Job")
Result = TypeVar("Result")


def threads_per_process(parallel: int) -> int:
    """CPU threads each of ``parallel`` processes may use: the cores this process may run on, shared out."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, parallel))


def device_env(device: str | None, cpu_threads: int | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a job's process: ``CUDA_VISIBLE_DEVICES`` = its device (when it has one) and, unless
    the caller's environment sets it, ``OMP_NUM_THREADS`` = its share of the cores (processes that each
    start one OpenMP thread per core keep the host busy spinning)."""
    env = dict(os.environ if base is None else base)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    if cpu_threads and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(cpu_threads)
    return env


def run_on_devices(
    work: Callable[[Job, str | None], Result], jobs: Iterable[Job], devices: Sequence[str | None]
) -> Iterator[tuple[Job, Result]]:
    """Run ``work(job, device)`` for every job, at most one job per device at a time; yield
    ``(job, result)`` in the order they finish. ``devices == [None]`` runs the jobs one after the other
    with no device named. An exception in ``work`` propagates when its result is reached."""
    if not devices:
        raise ValueError("run_on_devices needs at least one device (use [None] for no device)")
    free: queue.Queue = queue.Queue()
    for device in devices:
        free.put(device)

    def one(job: Job) -> Result:
        device = free.get()
        try:
            return work(job, device)
        finally:
            free.put(device)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(devices)) as pool:
        futures = {pool.submit(one, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()
