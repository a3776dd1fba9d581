"""One OpenMP team per process: torch's intra-op threads belong to the thread that runs the model.

libgomp (torch's OpenMP on Linux) gives every thread that starts a parallel region a team of worker threads
of its own, kept for the life of that thread. Once the process holds more OpenMP threads than it has CPUs,
libgomp stops spinning between parallel regions (its "throttled" spin count) and parks its workers instead,
so every parallel region of a step pays a futex wake-up, and a CPU decode step runs thousands of them.
Loading the model on the main thread and adapters on loader threads made two extra teams. Measured on
2 cores of an AMD EPYC (Zen 4), 193M Llama in bf16, one decode stream: 55 ms a token with the extra teams,
34 ms without them; a bf16->fp32 copy of 115k elements on a second thread: 26-57 us against 11 us.

So every thread that touches torch but is not the engine's calls ``serial_torch()`` first (its own parallel
regions run on one thread, no team), and the engine thread calls ``own_torch_threads()``, which gives it
the intra-op thread count the process had before any thread was made serial (``OMP_NUM_THREADS``, else the
cores torch sees).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
from collections.abc import Callable

import torch

log = logging.getLogger("loraserve.runtime")

_intra_op_threads: int | None = None  # the process's count before a thread was made serial


@functools.cache
def _omp_set_num_threads() -> Callable[[int], object] | None:
    """libgomp's (or libiomp's) ``omp_set_num_threads``, which sets the calling thread's team size only
    (``torch.set_num_threads`` also resets MKL's process-wide count); None where torch has no OpenMP."""
    candidates = [
        None,
        *sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "lib*omp*.so*"))),
    ]
    for path in candidates:
        try:
            return ctypes.CDLL(path).omp_set_num_threads
        except (OSError, AttributeError):
            continue
    return None


def serial_torch() -> bool:
    """Run the calling thread's torch CPU ops on that thread alone (it never starts an OpenMP team).
    False where this torch has no OpenMP to configure."""
    global _intra_op_threads
    set_threads = _omp_set_num_threads()
    if set_threads is None:
        return False
    # torch sets a thread's team size when it first asks for it: let it, then override
    threads = torch.get_num_threads()
    if _intra_op_threads is None:
        _intra_op_threads = threads
    set_threads(1)
    return True


def own_torch_threads() -> int:
    """Give the calling thread (the engine's) the process's intra-op threads; returns how many."""
    threads = _intra_op_threads if _intra_op_threads is not None else torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads
