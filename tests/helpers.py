"""Helpers shared by several test files (imported as ``helpers``; pytest puts ``tests/`` on ``sys.path``).

Test files never import each other: what two of them need lives here, in ``conftest.py`` (fixtures)
or in a helper module named for its concern (``prepare_raw``, ``processed_fixture``, ``ray_head``).
Nothing here depends on the working directory: paths are resolved from :data:`REPO`.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The repository root (the folder holding ``configs/``, ``dipro/`` and ``tests/``)."""

CONFIGS = REPO / "configs"


def config_path(name: str) -> Path:
    """``configs/<name>.yaml`` of this checkout, whatever the working directory."""
    return CONFIGS / f"{name}.yaml"


def repo_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that must import this checkout's ``dipro`` / ``data_sharding``."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def small_cfg(**overrides):
    """A small DiPro ``ModelConfig`` (the ``tiny`` backbone, 32 px crops) for CPU tests."""
    from dipro.config import ModelConfig

    base = dict(backbone="tiny", crop_size=32, d_model=32, num_layers=2, num_heads=4, group_k=4)
    base.update(overrides)
    return ModelConfig(**base)


def make_model(task: str, seed: int = 0, **overrides):
    """A seeded small :class:`dipro.model.DiPro` for ``task`` with uniform label statistics."""
    import torch

    from dipro.config import LossConfig
    from dipro.model import DiPro
    from dipro.model.synthetic import uniform_label_stats

    torch.manual_seed(seed)
    return DiPro(small_cfg(**overrides), task, uniform_label_stats(), LossConfig(consistency=1.0))


def make_checkpoint(path: Path, cfg, seed: int, val: float) -> Path:
    """A model directory (weights, config, label stats) of a seeded untrained model built from ``cfg``."""
    import torch

    from dipro.model import build_model
    from dipro.model.synthetic import uniform_label_stats
    from dipro.train.checkpoint import write_model_files

    torch.manual_seed(seed)
    stats = uniform_label_stats()
    model = build_model(cfg, stats)
    write_model_files(path, model.state_dict(), cfg, stats, {"best_value": val, "best_epoch": 1})
    return path


def make_run(storage: Path, name: str, steps=(2, 4, 6), world: int = 2) -> Path:
    """A local run directory with real checkpoints (of ``world`` ranks, with digests), as the ranks and
    Ray's upload leave them; tiny weights (no model is built)."""
    import shutil

    import torch

    from dipro.config import load_config
    from dipro.train import checkpoint as ck

    cfg = load_config(config_path("demo"))
    run_dir = Path(storage) / name
    for step in steps:
        ckpt = run_dir / f"checkpoint_s{step:08d}"
        for rank in range(world):
            with ck.staged_checkpoint(rank, "test checkpoint", "-") as local:
                ck.atomic_torch_save(ck.rng_state(), ck.rng_file(local, rank))
                if rank == 0:
                    ck.write_model_files(local, {"w": torch.full((64,), float(step))}, cfg, {},
                                         {"global_step": step, "epoch": 0, "kind": "step", "world_size": world,
                                          "strategy": "ddp"})
                ck.write_digest(local, rank)
                shutil.copytree(local, ckpt, dirs_exist_ok=True)  # Ray merges the ranks' directories
    return run_dir
