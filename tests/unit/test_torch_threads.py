"""torch's intra-op threads: a serial thread starts no OpenMP team, the engine thread gets the process's
count back (``adapter_store.torch_threads``)."""

from __future__ import annotations

import threading

import pytest
import torch

from adapter_store import torch_threads


def _in_thread(fn):  # type: ignore[no-untyped-def]
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def _serial_then_count() -> tuple[bool, int]:
    done = torch_threads.serial_torch()
    torch.ones(1 << 16).add_(1)  # a parallel op, run after the switch
    return done, torch.get_num_threads()


@pytest.mark.skipif(torch_threads._omp_set_num_threads() is None, reason="this torch has no OpenMP")
def test_serial_thread_runs_alone_and_engine_thread_gets_the_process_count() -> None:
    process = torch.get_num_threads()
    done, serial = _in_thread(_serial_then_count)
    assert done and serial == 1
    # the serial thread did not change the count other threads see
    assert torch.get_num_threads() == process
    assert _in_thread(torch_threads.own_torch_threads) == process
    assert torch.get_num_threads() == process
