"""A sweep's trials: the cross product of ``--grid KEY=V1,V2,...`` options x ``--seeds``.

    grid = parse_grid(["model.use_ehr=true,false", "optim.base_lr=5e-6,1e-5"])
    arms = expand(grid)                  # [Arm(0, (("model.use_ehr", "true"), ("optim.base_lr", "5e-6"))), ...]
    trials = make_trials(arms, [23, 29]) # Trial("a00-s23", arm 0, seed 23), ...

An *arm* is one combination of grid values (the first value of every key is arm 0, the baseline
unless ``--baseline`` names another); a *trial* is an arm trained with one seed.  Trial keys are
deterministic (``a{arm}-s{seed}``; ``s{seed}`` when there is no grid), and so are the trials' run
names (``{sweep}-{key}``): a restarted trial finds its own run directory and MLflow run again.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from data_sharding.errors import ConfigError


@dataclass(frozen=True)
class Arm:
    index: int
    values: tuple[tuple[str, str], ...]
    """(key, value) pairs, in ``--grid`` order (empty: the config as it is)."""

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.values]

    @property
    def label(self) -> str:
        return " ".join(self.overrides) or "config"


@dataclass(frozen=True)
class Trial:
    key: str
    arm: Arm
    seed: int

    def run_name(self, sweep: str) -> str:
        return f"{sweep}-{self.key}"

    def owner(self, sweep: str) -> str:
        """What a trial's run directory records as its owner (``dipro.train.rundir.claim``)."""
        return f"sweep:{sweep}/{self.key}"

    @property
    def overrides(self) -> list[str]:
        return [*self.arm.overrides, f"seed={self.seed}"]


def _split_values(text: str) -> list[str]:
    """``a,b,[1,2],c`` -> ``["a", "b", "[1,2]", "c"]`` (commas inside brackets or quotes stay)."""
    values, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(cur.strip())
            cur = ""
            continue
        cur += ch
    values.append(cur.strip())
    return values


def parse_grid(items: list[str] | None) -> dict[str, list[str]]:
    """``["KEY=V1,V2", ...]`` -> {KEY: [V1, V2]} (values kept as text: each becomes a ``key=value`` override)."""
    grid: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. model.use_ehr=true,false)")
        if key in grid:
            raise ConfigError(f"--grid names {key!r} twice; give all its values in one --grid {key}=V1,V2")
        if key == "seed":
            raise ConfigError("--grid seed=...: seeds are given with --seeds S1,S2,...")
        values = _split_values(raw)
        if not values or any(v == "" for v in values):
            raise ConfigError(f"--grid {item!r}: empty value (expected KEY=V1,V2,...)")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {item!r} lists a value twice")
        grid[key] = values
    return grid


def expand(grid: dict[str, list[str]]) -> list[Arm]:
    """Every combination of the grid's values, the first values first (arm 0)."""
    keys = list(grid)
    combos = itertools.product(*(grid[k] for k in keys)) if keys else [()]
    return [Arm(i, tuple(zip(keys, combo))) for i, combo in enumerate(combos)]


def make_trials(arms: list[Arm], seeds: list[int]) -> list[Trial]:
    """Arm x seed, arm-major; keys ``a{arm:02d}-s{seed}`` (``s{seed}`` for a grid-less sweep)."""
    one = len(arms) == 1 and not arms[0].values
    return [Trial(f"s{seed}" if one else f"a{arm.index:02d}-s{seed}", arm, seed) for arm in arms for seed in seeds]


def baseline_arm(arms: list[Arm], baseline: str | None) -> Arm:
    """Arm 0, or the first arm whose values include every ``KEY=V`` of ``--baseline K=V[,K2=V2]``."""
    if not baseline:
        return arms[0]
    wanted = []
    for part in _split_values(baseline):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"--baseline {baseline!r}: expected KEY=V (one of the grid's values)")
        wanted.append((key.strip(), value.strip()))
    for arm in arms:
        if all(pair in arm.values for pair in wanted):
            return arm
    raise ConfigError(f"--baseline {baseline!r} matches no arm of the grid; arms: "
                      + "; ".join(a.label for a in arms))
