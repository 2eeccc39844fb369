"""Training augmentation: the pixel transform (dipro.data.augment) and where the model applies it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_sharding.constants import NUM_REGIONS
from dipro.data.augment import AUGMENT_KEYS, AugmentConfig, apply_augmentation, draw_augmentation
from data_sharding.errors import DataError
from dipro.model.synthetic import random_batch
from helpers import make_model


def _ramp(n: int = 3, c: int = 16) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(c), torch.arange(c), indexing="ij")
    return torch.stack([(40 + 5 * yy + 3 * xx + 7 * i).float() / 255.0 for i in range(n)])  # distinct pixels


def test_identity_parameters_change_nothing():
    x = _ramp()
    y = apply_augmentation(x, torch.ones(3), torch.zeros(3), torch.zeros(3, 2, dtype=torch.long))
    assert torch.allclose(y, x, atol=1e-6)


def test_intensity_matches_the_grey_level_formula_with_clipping():
    x = torch.linspace(0, 1, 256).repeat(2, 1).view(2, 16, 16)
    a, b = torch.tensor([1.3, 1.2]), torch.tensor([-40.0, 40.0])
    y = apply_augmentation(x, a, b, torch.zeros(2, 2, dtype=torch.long))
    grey = x.numpy() * 255.0
    expected = np.clip((grey - 127.5) * a.numpy()[:, None, None] + 127.5 + b.numpy()[:, None, None], 0, 255) / 255.0
    assert np.allclose(y.numpy(), expected, atol=1e-5)
    assert y.min() == 0.0 and y.max() == 1.0  # clipped at both ends, not wrapped


@pytest.mark.parametrize("dy,dx", [(2, 0), (0, -3), (-1, 2)])
def test_translation_moves_content_and_repeats_the_edge(dy, dx):
    x = _ramp(1)
    y = apply_augmentation(x, torch.ones(1), torch.zeros(1), torch.tensor([[dy, dx]]))[0]
    c = x.shape[-1]
    for i in range(c):
        for j in range(c):
            src_i, src_j = min(max(i - dy, 0), c - 1), min(max(j - dx, 0), c - 1)
            assert y[i, j] == pytest.approx(float(x[0, src_i, src_j]), abs=1e-6)


def test_draws_stay_in_the_configured_ranges():
    cfg = AugmentConfig(contrast=0.2, brightness=5.0, max_shift=0.1)
    p = draw_augmentation(NUM_REGIONS, 50, np.random.default_rng(0), cfg)
    assert set(p) == set(AUGMENT_KEYS)
    assert p["aug_contrast"].shape == (NUM_REGIONS,) and np.all(np.abs(p["aug_contrast"] - 1) <= 0.2)
    assert np.all(np.abs(p["aug_brightness"]) <= 5.0)
    assert p["aug_shift"].shape == (NUM_REGIONS, 2) and np.abs(p["aug_shift"]).max() <= 5


# ----------------------------------------------------------------------------- in the model

def _capture_backbone_inputs(model) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.region_encoder.backbone.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().clone()))
    return seen


def _identical_cxrs_batch() -> dict:
    batch = random_batch("mortality", batch_size=2, num_cxrs=3, crop_size=32, missing_region_prob=0.0, seed=1)
    batch["crops"][:, 1:] = batch["crops"][:, :1]  # three CXRs with the same regions: no change to see
    batch["region_mask"][1, :, 4] = False  # one region missing in sample 1
    batch["crops"][1, :, 4] = 0
    rng = np.random.default_rng(0)
    params = [draw_augmentation(NUM_REGIONS, 32, rng, AugmentConfig(max_shift=0.1)) for _ in range(2)]
    for k in AUGMENT_KEYS:
        batch[k] = torch.from_numpy(np.stack([p[k] for p in params]))
    return batch


def test_training_applies_one_transform_per_region_in_every_cxr():
    # every crop of a real CXR is encoded, scaled to [0, 1]; a missing region as a black crop
    model = make_model("mortality").train()
    seen = _capture_backbone_inputs(model)
    batch = _identical_cxrs_batch()
    model(batch)
    model({k: v for k, v in batch.items() if k not in AUGMENT_KEYS})
    augmented, plain = seen
    present = batch["region_mask"]
    assert augmented.shape[0] == 2 * 3 * NUM_REGIONS
    full = augmented.view(2, 3, NUM_REGIONS, *augmented.shape[1:])
    assert torch.equal(full[:, 0], full[:, 1]) and torch.equal(full[:, 1], full[:, 2])  # no spurious "change"
    assert not torch.allclose(augmented, plain)
    assert full[1, :, 4].abs().sum() == 0  # the missing region stays black under augmentation
    # each present crop got exactly its (sample, region)'s transform
    sel = present.flatten()
    b_idx, _, r_idx = present.nonzero(as_tuple=True)
    params = [batch[k][b_idx, r_idx] for k in AUGMENT_KEYS]
    expected = apply_augmentation(plain[sel][:, 0], *params)
    assert torch.allclose(augmented[sel][:, 0], expected, atol=1e-5)


def test_evaluation_ignores_augmentation_parameters():
    model = make_model("mortality").eval()
    seen = _capture_backbone_inputs(model)
    batch = _identical_cxrs_batch()
    with torch.no_grad():
        a = model(batch)["logits"]
        b = model({k: v for k, v in batch.items() if k not in AUGMENT_KEYS})["logits"]
    assert torch.equal(seen[0], seen[1]) and torch.equal(a, b)


def test_malformed_augmentation_parameters_are_data_errors():
    model = make_model("mortality").train()
    batch = _identical_cxrs_batch()
    batch["aug_shift"] = batch["aug_shift"][:, :5]
    with pytest.raises(DataError, match="augmentation parameters"):
        model(batch)
    del batch["aug_shift"]
    with pytest.raises(DataError, match="aug_shift"):
        model(batch)
