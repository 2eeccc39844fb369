"""The training shuffle buffer: a permutation, bounded in samples and bytes, quick to start."""
from __future__ import annotations

import numpy as np
import pytest

from dipro.data.reader import Skipped
from dipro.data.shuffle import bounded_shuffle, sample_bytes, worker_budget


def _samples(n: int, size: int = 100) -> list[dict]:
    return [{"__key__": f"k{i}", "crops.npy": bytes(size), "labels.json": b"{}"} for i in range(n)]


class Tracked:
    """A source that records, at every output of the shuffle, how much it had handed out."""

    def __init__(self, items):
        self.items, self.read = list(items), 0

    def __iter__(self):
        for item in self.items:
            self.read += 1
            yield item


def _run(source: Tracked, **kw):
    out, outstanding = [], []
    for item in bounded_shuffle(iter(source), rng=np.random.default_rng(kw.pop("seed", 0)), **kw):
        out.append(item)
        if not isinstance(item, Skipped):
            outstanding.append(source.read - len([o for o in out if not isinstance(o, Skipped)])
                               - sum(isinstance(s, Skipped) for s in source.items[:source.read]))
    return out, outstanding


def test_every_sample_once_and_skips_pass_through():
    items = _samples(50)
    items.insert(7, Skipped("a.tar", "k6x", "bad"))
    items.insert(30, Skipped("a.tar", "k28x", "bad", count=3))
    out, _ = _run(Tracked(items), max_samples=8, max_bytes=10**9)
    assert sorted(o["__key__"] for o in out if isinstance(o, dict)) == sorted(f"k{i}" for i in range(50))
    assert [o.key for o in out if isinstance(o, Skipped)] == ["k6x", "k28x"]
    assert [o["__key__"] for o in out if isinstance(o, dict)] != [f"k{i}" for i in range(50)]


def test_buffer_never_exceeds_its_sample_bound_and_starts_after_a_quarter():
    source = Tracked(_samples(200))
    out, outstanding = _run(source, max_samples=16, max_bytes=10**9)
    assert len(out) == 200
    assert max(outstanding) == 15  # 16 held, one just handed out
    first = next(iter(bounded_shuffle(iter(Tracked(_samples(200))), max_samples=16, max_bytes=10**9,
                                      rng=np.random.default_rng(0))))
    assert first is not None
    src = Tracked(_samples(200))
    it = bounded_shuffle(iter(src), max_samples=16, max_bytes=10**9, rng=np.random.default_rng(0))
    next(it)
    assert src.read <= 16 // 4 + 2  # warm-up of a quarter, then at most two reads before the first output


def test_buffer_never_exceeds_its_byte_bound():
    size = sample_bytes(_samples(1)[0])
    source = Tracked(_samples(120))
    out, outstanding = _run(source, max_samples=10**6, max_bytes=10 * size)
    assert len(out) == 120
    assert max(outstanding) * size < 10 * size  # at most 10 samples' bytes held, one just handed out
    src = Tracked(_samples(120))
    it = bounded_shuffle(iter(src), max_samples=10**6, max_bytes=10 * size, rng=np.random.default_rng(0))
    next(it)
    assert src.read <= -(-10 // 4) + 2  # ceil: the warm-up stops once a quarter of the bytes are held


def test_a_sample_larger_than_the_byte_bound_still_passes():
    items = _samples(5, size=1000)
    out, outstanding = _run(Tracked(items), max_samples=8, max_bytes=10)
    assert sorted(o["__key__"] for o in out) == [f"k{i}" for i in range(5)]
    assert max(outstanding) == 0


def test_deterministic_per_seed():
    def keys(seed):
        return [o["__key__"] for o in bounded_shuffle(iter(_samples(60)), max_samples=12, max_bytes=10**9,
                                                       rng=np.random.default_rng(seed))]
    assert keys(1) == keys(1)
    assert keys(1) != keys(2)


def test_worker_budget_splits_the_rank_budget():
    assert worker_budget(256, 256 * 2**20, 8) == (32, 32 * 2**20)
    assert worker_budget(10, 100, 3) == (4, 33)
    assert worker_budget(256, 100, 0) == (256, 100)  # in-process loading: one stream
    assert worker_budget(1, 1, 4) == (1, 1)


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="bounds"):
        list(bounded_shuffle(iter(_samples(2)), max_samples=0, max_bytes=10, rng=np.random.default_rng(0)))
