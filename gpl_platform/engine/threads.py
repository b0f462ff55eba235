"""How many threads torch uses while one of the pipeline's small models trains."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count is ``threads`` inside the block (None: torch's own setting), and what it
    was afterwards. The pipeline's models are small (a 64-unit MLP, a two-layer SID transformer, an RQ-VAE),
    so each op is a short parallel region whose threads wait for one another: when other processes share
    the cores, a descheduled thread stalls the rest. Measured on the demo at load 3-4 on 2 cores: the SID
    generators trained 15-20x slower with 2 threads than with 1 (60-194 s per refit against 3-33 s)."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    previous = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(previous)
