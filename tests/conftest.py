"""Fixtures shared by every test folder: the embedded demo bundle, built once per machine and cached
(``~/.cache/loraserve``, or ``LORASERVE_TEST_CACHE``), since building it costs tens of seconds."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

# One intra-op thread per process: the test process, the servers it starts (they inherit the variable) and
# the other workers share two cores, and spinning OpenMP threads made tiny matmuls hundreds of times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def demo_cache_dir() -> Path | None:
    value = os.environ.get("LORASERVE_TEST_CACHE")
    return Path(value) if value else None


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _root_logging_as_it_was() -> Iterator[None]:
    """A test that runs ``server.cli.main`` in-process sets the root logger's handler to the stderr of that
    moment, which is the test's capture; engine threads of later tests then logged into the closed capture
    ("--- Logging error ---"). Each test leaves the root logger, and the warnings it captures, as it was."""
    root = logging.getLogger()
    handlers, level, showwarning = root.handlers[:], root.level, warnings.showwarning
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    if warnings.showwarning is not showwarning:  # main's logging.captureWarnings(True)
        logging.captureWarnings(False)


@pytest.fixture(scope="session")
def demo_bundle():  # type: ignore[no-untyped-def]
    from server.runtime.demo import ensure_demo

    return ensure_demo(demo_cache_dir(), progress=False)
