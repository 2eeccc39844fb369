"""The training stream's sample shuffle buffer, bounded in samples AND in bytes.

WebDataset's ``shuffle(bufsize, initial)`` counts samples only and fills
``initial`` of them before its first output.  A mortality sample of the paper
configuration is up to ~7 MB (14 CXRs x 10 regions x 224 px), so a 256-sample
buffer per loader worker meant ~1.8 GB per worker and a first batch only after
each worker had read 256 samples: more loader workers made a rank slower.

Here the buffer of one stream (rank x loader worker) holds at most
``max_samples`` samples and ``max_bytes`` bytes of raw tar members (the rank's
budget is split over its loader workers by :func:`worker_budget`).  It starts
yielding once a quarter of either bound is filled and then grows while
yielding (two reads per output until full, as WebDataset does), so the time to
the first batch stays short; from then on every output is a uniform draw
from the buffer, seeded per (seed, epoch, rank, worker).  A single sample
larger than ``max_bytes`` still passes (through a buffer of one).
:class:`~dipro.data.reader.Skipped` records pass straight through, so they are
counted by the batch stage as before.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from dipro.data.reader import Skipped

WARMUP_FRACTION = 4
"""Outputs start when 1/WARMUP_FRACTION of the sample or byte bound is buffered."""


def sample_bytes(sample: dict[str, Any]) -> int:
    """Bytes of a raw sample's tar members (what the buffer holds in memory)."""
    return sum(len(v) for v in sample.values() if isinstance(v, (bytes, bytearray, memoryview)))


def worker_budget(max_samples: int, max_bytes: int, num_workers: int) -> tuple[int, int]:
    """One loader worker's share of the rank's (samples, bytes) shuffle budget (at least one sample)."""
    n = max(1, num_workers)
    return max(1, math.ceil(max_samples / n)), max(1, max_bytes // n)


def bounded_shuffle(samples: Iterator[Any], *, max_samples: int, max_bytes: int,
                    rng: np.random.Generator) -> Iterator[Any]:
    """Yield every item of ``samples`` once, shuffled through a buffer of at most
    ``max_samples`` samples and ``max_bytes`` bytes (see the module doc)."""
    if max_samples < 1 or max_bytes < 1:
        raise ValueError(f"shuffle buffer bounds must be >= 1, got {max_samples} samples, {max_bytes} bytes")
    buf: list[Any] = []
    sizes: list[int] = []
    held = 0
    warm_samples = max(1, max_samples // WARMUP_FRACTION)
    warm_bytes = max(1, max_bytes // WARMUP_FRACTION)
    source = iter(samples)
    exhausted = False

    def full() -> bool:
        return len(buf) >= max_samples or held >= max_bytes

    def take() -> Iterator[Skipped]:
        """Read one sample into the buffer; Skipped records read on the way are handed back."""
        nonlocal held, exhausted
        for item in source:
            if isinstance(item, Skipped):
                yield item
                continue
            size = sample_bytes(item)
            buf.append(item)
            sizes.append(size)
            held += size
            return
        exhausted = True

    while not exhausted and not full() and len(buf) < warm_samples and held < warm_bytes:
        yield from take()
    while buf:
        for _ in range(2):
            if exhausted or full():
                break
            yield from take()
        i = int(rng.integers(len(buf)))
        buf[i], buf[-1] = buf[-1], buf[i]
        sizes[i], sizes[-1] = sizes[-1], sizes[i]
        held -= sizes.pop()
        yield buf.pop()
        if not buf and not exhausted:
            yield from take()
