"""precompile: build many kernels at once in a process pool, filling the disk cache. Processes, not threads: an
NVRTC compile may hold the GIL throughout. Workers are spawned, not forked: forking after CUDA init is unsafe."""
from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import List, Optional, Sequence, Tuple

from .build import CompiledKernel, compile_kernel, find_cached, remember
from .compiler import CompilationError

Job = Tuple[str, str, str, str]  # (name, source, kernel_name, arch)


def _compile_job(job: Job) -> CompiledKernel:
    name, source, kernel_name, arch = job
    return compile_kernel(source, kernel_name, arch=arch, name=name)


def _check_jobs(jobs) -> List[Job]:
    checked = []
    for i, job in enumerate(jobs):
        if not (isinstance(job, (tuple, list)) and len(job) == 4 and all(isinstance(x, str) for x in job)):
            raise TypeError(f"precompile: job {i} must be a tuple of 4 strings "
                            f"(name, source, kernel_name, arch), got {type(job).__name__}")
        checked.append(tuple(job))
    return checked


class _Progress:
    """A one-line progress bar on stderr: ``[12/40] name``."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.width = total, 0, enabled and total > 0, 0

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            text = f"[{self.done}/{self.total}] {label}"
            # Pad over a longer previous line; \r keeps the bar on one line.
            sys.stderr.write("\r" + text.ljust(self.width))
            sys.stderr.flush()
            self.width = max(self.width, len(text))

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def precompile(jobs: Sequence[Job], *, workers: Optional[int] = None, progress: bool = True) -> List[CompiledKernel]:
    """Compile every ``(name, source, kernel_name, arch)`` job, in parallel, and return the kernels in job order.

    Identical jobs are compiled once; kernels already in the disk cache are loaded without starting any worker.
    ``workers`` defaults to the CPU count, at most 16 (each worker is a fresh Python process importing deep_gemm).
    When some jobs fail, the others still finish (and are cached) before the first failure is raised."""
    jobs = _check_jobs(jobs)
    unique = list(dict.fromkeys(jobs))
    results = {}
    todo = []
    for job in unique:
        name, source, kernel_name, arch = job
        hit = find_cached(source, kernel_name, arch=arch, name=name)
        if hit is not None:
            results[job] = hit
        else:
            todo.append(job)
    bar = _Progress(len(unique), progress)
    for job in unique:
        if job in results:
            bar.step(job[0])
    errors = {}
    if workers is None:
        workers = min(os.cpu_count() or 1, 16)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    workers = min(workers, len(todo))
    try:
        if workers <= 1:
            for job in todo:
                try:
                    results[job] = _compile_job(job)
                except Exception as e:  # collected and raised below
                    errors[job] = e
                bar.step(job[0])
        elif todo:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = {pool.submit(_compile_job, job): job for job in todo}
                for future in as_completed(futures):
                    job = futures[future]
                    try:
                        results[job] = remember(job[1], future.result())
                    except Exception as e:
                        errors[job] = e
                    bar.step(job[0])
    finally:
        bar.close()
    if errors:
        failed = [job for job in unique if job in errors]
        first = errors[failed[0]]
        names = ", ".join(job[0] for job in failed)
        message = (f"precompile: {len(failed)} of {len(unique)} kernels failed ({names}); first failure:\n{first}")
        if isinstance(first, CompilationError):
            raise CompilationError(message, first.log, first.source_path) from first
        raise RuntimeError(message) from first
    return [results[job] for job in jobs]
