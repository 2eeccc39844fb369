"""The planted signal is learnable through the whole pipeline, and only with the true labels.

A cohort from ``dipro synth`` goes through ``dipro prepare`` and ``dipro shard``;
for every task a small DiPro is trained in-process on the training shards twice,
once with the true labels and once with labels -- the task's and PAE's region
labels alike -- permuted inside each batch (the control: same inputs, same
optimisation, no association between input and label), and both are evaluated
on held-out data (val + test pooled).  A model that reads a leak
or a broken pipeline fails this: either both learn, or neither does.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dipro.config import load_config
from dipro.metrics import compute_metrics
from dipro.train.data import TASK_LABEL_KEY, read_label_stats, train_loader
from dipro.train.evaluate import evaluate_model

pytestmark = pytest.mark.slow

# Held-out score per task (higher is better) and the margin by which the true-label model must
# beat the control.  Mortality is scored by the Brier score, not AUROC: the first 48 h of EHR
# vary mostly along the planted sickness drift, so *any* one-logit projection -- even one fitted
# to permuted labels -- ranks deaths well or exactly backwards (AUROC ~0.8 or ~0.2 by the seed),
# while only a model that learned the labels predicts calibrated risks.  A model trained on
# permuted labels collapses to the class prior, which kappa scores 0 for length of stay.
# With 8 epochs, over model seeds 23 / 29 / 66 (2026-11-30), true labels beat the control by
# mortality -Brier 0.066 / 0.080 / 0.103, LOS kappa 0.349 / 0.263 / 0.419, progression AUROC
# 0.150 / 0.145 / 0.173 (2 threads); in the suite (OMP_NUM_THREADS=1 from conftest, where a run is
# bit-for-bit repeatable) seed 23 gives 0.046 / 0.349 / 0.169: each at least 1.4x its margin.
# With the authors' interleaved reversed pair (model.pair_reversal=interleave, the task configs' since
# 2026-12-02) seed 23 in the suite's setting gives 0.060 / 0.332 / 0.193: at least 1.9x.
METRIC = {"mortality": ("-brier", 0.03), "length_of_stay": ("kappa", 0.10), "disease_progression": ("auroc", 0.10)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_sharding import synth
    from data_sharding.manifest import ShardSettings
    from data_sharding.prepare import PrepareOptions, prepare
    from data_sharding.readers import resolve_roots
    from data_sharding.shard_writer import write_shards

    root = tmp_path_factory.mktemp("learn")
    synth.generate(root / "raw", patients=300, seed=3, image_size=128, progress=False)
    prepare(resolve_roots(str(root / "raw"), None, None, None), root / "processed",
            PrepareOptions(progress=False))
    write_shards(root / "processed", root / "shards", settings=ShardSettings(crop_size=32), progress=False)
    return root / "shards"


def _train(cfg, label_stats, shuffled: bool):
    from dipro.model import build_model
    from dipro.train.optim import build_optimizer, build_scheduler

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, label_stats)
    # the optimiser and schedule of `dipro train` (AdamW at cfg.effective_lr, cosine per epoch to
    # optim.min_lr): BatchNorm's running statistics, which evaluation uses, settle as the rate decays
    steps_per_epoch = len(train_loader(cfg, rank=0, world_size=1, epoch=0))
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch * cfg.trainer.max_epochs)
    key = TASK_LABEL_KEY[cfg.task]
    gen = torch.Generator().manual_seed(1234)
    for epoch in range(cfg.trainer.max_epochs):
        model.train()
        for batch in train_loader(cfg, rank=0, world_size=1, epoch=epoch):
            if shuffled:
                perm = torch.randperm(batch[key].shape[0], generator=gen)
                batch[key] = batch[key][perm]
                # PAE's region labels are supervision too (and carry the stay's course, which the
                # LOS and mortality labels depend on): the control must not see them either.
                batch["region_labels"] = batch["region_labels"][perm]
            loss, _ = model.compute_loss(batch, model(batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model


def _held_out(model, cfg, shard_dir, metric):
    """The metric over val and test pooled (one larger held-out set, less variance than two small ones)."""
    results = [evaluate_model(model, cfg, split, shard_dir=shard_dir) for split in ("val", "test")]
    y_true = np.concatenate([r.y_true for r in results])
    y_prob = np.concatenate([r.y_prob for r in results])
    if metric == "-brier":
        return -float(np.mean((y_prob.astype(np.float64) - y_true) ** 2))
    return float(compute_metrics(cfg.task, y_true, y_prob)[metric])


@pytest.mark.parametrize("task", ["mortality", "length_of_stay", "disease_progression"])
def test_true_labels_beat_shuffled_labels(task, shards):
    cfg = load_config("configs/demo.yaml", [
        f"task={task}", f"data.shards={shards}", "trainer.max_epochs=8", "data.num_loader_workers=0",
        "data.batch_size=8", "optim.base_lr=2.5e-4", "data.augment=false", "model.use_pae=true",  # lr 8 x 2.5e-4
    ])
    label_stats = read_label_stats(shards)
    metric, margin = METRIC[task]
    real = _held_out(_train(cfg, label_stats, shuffled=False), cfg, shards, metric)
    control = _held_out(_train(cfg, label_stats, shuffled=True), cfg, shards, metric)
    print(f"{task}: held-out {metric} true labels {real:.3f} vs shuffled {control:.3f}")
    assert np.isfinite(real) and np.isfinite(control)
    assert real >= control + margin, f"{task}: {metric} {real:.3f} does not beat the shuffled control {control:.3f} by {margin}"
