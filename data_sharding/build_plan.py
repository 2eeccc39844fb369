"""Who builds what: the planned shards cut into balanced units of work, around films.

The shard plan (:func:`data_sharding.shard_writer.plan_shards`) fixes which rows go into which
shard.  Building it sample by sample would decode a film once per sample, task series and
shard that uses it; here the build walks *stays* instead: a stay's films are used only by that
stay's samples (its progression pairs and its mortality/LOS sample), and every series is sorted
by (stay_id, row), so walking the stays of a split in order meets the samples of every series in
shard order.  One walk therefore decodes each film once and writes every series at once.

:func:`plan_units` cuts the walk (split by split, stays in order) into ``n`` contiguous units
of about equal estimated cost (:func:`stay_cost`: film pixels to decode and crop, plus sample
bytes to write), so ``n`` workers take about 1/n of the time each, whatever the shard sizes.
A shard whose rows fall into two or more units is written as parts (:class:`Segment` with
``parts > 1``), one per unit, and joined in order afterwards (``build_units.join_parts``);
the units' boundaries are the only places where a shard is written in parts, so at most
``2 (n - 1)`` shards are joined.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data_sharding.constants import SPLITS

DECODE_S_PER_PIXEL = 5.0e-9
"""Estimated seconds to decode and crop one film pixel (MIMIC film, crop 224, one 2026 core: ~28 ms
for 2,300 x 2,560 pixels).  Only the ratio to :data:`WRITE_S_PER_BYTE` matters: it balances units."""
WRITE_S_PER_BYTE = 1.5e-9
"""Estimated seconds to encode, hash and write one byte of a shard."""


@dataclass(frozen=True)
class Segment:
    """Consecutive rows ``plan.rows[start:stop]`` of one planned shard, written by one unit."""

    plan: Any
    """The :class:`data_sharding.shard_writer.ShardPlan`."""
    start: int
    stop: int
    part: int
    """Index of this part among the shard's parts (0 when the unit writes the whole shard)."""
    parts: int
    """How many units write this shard (1: this unit writes it whole)."""

    @property
    def rows(self) -> tuple[int, ...]:
        return self.plan.rows[self.start:self.stop]


@dataclass(frozen=True)
class BuildUnit:
    """One worker's share of a build: segments in walk order, and what they cost."""

    index: int
    segments: tuple[Segment, ...]
    films: int
    """Films this unit decodes (each once)."""
    cost: float
    """Estimated seconds (:func:`stay_cost` summed)."""


def stay_films(view, task: str, row: dict[str, Any]) -> list[tuple[int, str]]:
    """(stay_id, dicom_id) of every film a task row uses, in the row's order."""
    from data_sharding.samples import row_cxrs

    stay = int(row["stay_id"])
    return [(stay, str(d)) for d in row_cxrs(task, row)[0]]


def plan_films(view, plan) -> list[str]:
    """Image paths of every film the samples of one planned shard use (each once, in first-use order)."""
    table = view.task_rows(plan.task)
    where = f"{view.task_path(plan.task)}"
    paths: dict[str, None] = {}
    for i in plan.rows:
        for stay, dicom in stay_films(view, plan.task, table[i]):
            paths[str(view.cxr_row(stay, dicom, f"{where} row {i}")["image_path"])] = None
    return list(paths)


def stay_cost(view, films: set[tuple[int, str]], sample_bytes: float) -> float:
    """Estimated seconds for one stay: its films' pixels (``cxr.parquet`` width x height) and its samples' bytes."""
    pixels = 0
    for stay, dicom in films:
        row = view.cxr_rows.get((stay, dicom))
        if row is not None and row.get("width") and row.get("height"):
            pixels += int(row["width"]) * int(row["height"])
    return pixels * DECODE_S_PER_PIXEL + sample_bytes * WRITE_S_PER_BYTE


def plan_units(view, plans: list, n_units: int) -> list[BuildUnit]:
    """Cut the walk over the stays of ``plans`` into at most ``n_units`` balanced units (module docstring)."""
    # walk items: (split position, stay_id) -> films, estimated sample bytes
    films: dict[tuple[int, int], set[tuple[int, str]]] = {}
    sample_bytes: dict[tuple[int, int], float] = {}
    item_of: dict[tuple[str, int], tuple[int, int]] = {}  # (shard path, row) -> walk item
    for plan in plans:
        table = view.task_rows(plan.task)
        per_sample = plan.est_bytes / max(1, len(plan.rows))
        for i in plan.rows:
            row = table[i]
            item = (SPLITS.index(plan.split), int(row["stay_id"]))
            films.setdefault(item, set()).update(stay_films(view, plan.task, row))
            sample_bytes[item] = sample_bytes.get(item, 0.0) + per_sample
            item_of[(plan.path, i)] = item
    walk = sorted(films)
    costs = [stay_cost(view, films[item], sample_bytes[item]) for item in walk]
    n = max(1, min(n_units, len(walk)))
    total = sum(costs) or 1.0
    unit_of: dict[tuple[int, int], int] = {}
    unit, acc = 0, 0.0
    for item, cost in zip(walk, costs):
        # move on when this item's midpoint lies past the current unit's share of the total
        if unit < n - 1 and acc + cost / 2 > total * (unit + 1) / n:
            unit += 1
        unit_of[item] = unit
        acc += cost
    used = sorted(set(unit_of.values()))
    renumber = {u: k for k, u in enumerate(used)}
    unit_of = {item: renumber[u] for item, u in unit_of.items()}

    segments: dict[int, list[Segment]] = {k: [] for k in range(len(used))}
    for plan in plans:
        owners = [unit_of[item_of[(plan.path, i)]] for i in plan.rows]
        cuts = [0] + [j for j in range(1, len(owners)) if owners[j] != owners[j - 1]] + [len(owners)]
        parts = len(cuts) - 1
        for part, (a, b) in enumerate(zip(cuts, cuts[1:])):
            segments[owners[a]].append(Segment(plan, a, b, part, parts))
    units = []
    for k in range(len(used)):
        items = [item for item in walk if unit_of[item] == k]
        unit_films = set().union(*(films[item] for item in items)) if items else set()
        units.append(BuildUnit(k, tuple(segments[k]), len(unit_films),
                               sum(c for item, c in zip(walk, costs) if unit_of[item] == k)))
    return units
