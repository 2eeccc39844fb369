"""Round trip processed dir -> data_sharding.shard_writer -> dipro.data.build_loader.

What the loader yields must equal what ``dipro prepare`` wrote: EHR windows,
demographics, labels and region labels exactly; crops within JPEG/resize
tolerance of an independent crop of the full image; missing boxes marked missing.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_sharding.constants import (BOX_COLUMNS, DEMOGRAPHIC_COLUMNS, DISEASE_SLUGS, EHR_MASK_COLUMNS,
                                     EHR_VALUE_COLUMNS, ICU_WINDOW_STEPS, REGION_SLUGS)

import data_sharding.shard_writer as shard_writer  # noqa: E402
import processed_fixture  # noqa: E402

from dipro.data import build_loader  # noqa: E402

CROP = 16


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from data_sharding.manifest import ShardSettings

    root = tmp_path_factory.mktemp("writer_rt")
    fx = processed_fixture.make_processed(root / "processed", n_stays=8, image_size=(160, 192))
    shard_writer.write_shards(root / "processed", root / "shards", settings=ShardSettings(crop_size=CROP, max_samples_per_shard=2),
                              workers=1, progress=False)
    p = root / "processed"
    ehr = pd.concat([pd.read_parquet(f) for f in sorted((p / "ehr").glob("part-*.parquet"))])
    return fx, root / "shards", {
        "cxr": pd.read_parquet(p / "cxr.parquet").set_index("dicom_id"),
        "ehr": ehr, "demo": pd.read_parquet(p / "demographics.parquet").set_index("stay_id"),
        "mortality_los": pd.read_parquet(p / "tasks/mortality_los.parquet").set_index("stay_id"),
        "disease_progression": pd.read_parquet(p / "tasks/disease_progression.parquet"),
    }


def _expected_crop(cxr_row, region: int) -> np.ndarray | None:
    box = cxr_row[BOX_COLUMNS[region]]
    if box is None or box[2] <= box[0] or box[3] <= box[1]:
        return None
    with Image.open(cxr_row["image_path"]) as img:
        return np.asarray(img.convert("L").crop(tuple(box)).resize((CROP, CROP), Image.BILINEAR), dtype=np.float32)


def _check_crops(batch, i, dicom_ids, cxr) -> None:
    for t, dicom in enumerate(dicom_ids):
        for r in range(len(REGION_SLUGS)):
            expected = _expected_crop(cxr.loc[dicom], r)
            got = batch["crops"][i, t, r].numpy().astype(np.float32)
            if expected is None:
                assert not batch["region_mask"][i, t, r] and not got.any()
            else:
                assert batch["region_mask"][i, t, r]
                assert np.abs(got - expected).mean() < 12.0, (dicom, REGION_SLUGS[r])


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_mortality_los_round_trip_from_processed(built, split):
    fx, shards, tables = built
    seen = 0
    for batch in build_loader(shards, "mortality", split, 2, 0, augment=False, shuffle=False):
        for i, stay in enumerate(batch["stay_id"].tolist()):
            row = tables["mortality_los"].loc[stay]
            seen += 1
            assert batch["mortality"][i].item() == row["mortality"] and batch["los_bin"][i].item() == row["los_bin"]
            assert batch["los_days"][i].item() == pytest.approx(row["los_days"], rel=1e-5)
            t = len(row["dicom_ids"])
            assert batch["cxr_mask"][i].sum().item() == t
            assert np.allclose(batch["cxr_hours"][i, :t].numpy(), np.asarray(row["cxr_hours"], dtype=np.float32))
            window = tables["ehr"][(tables["ehr"].stay_id == stay) & (tables["ehr"].hour < ICU_WINDOW_STEPS)].sort_values("hour")
            n = len(window)
            assert batch["ehr_mask"][i].sum().item() == n
            assert np.array_equal(batch["ehr_values"][i, :n].numpy(), window[list(EHR_VALUE_COLUMNS)].to_numpy(np.float32))
            assert np.array_equal(batch["ehr_obs_mask"][i, :n].numpy(), window[list(EHR_MASK_COLUMNS)].to_numpy(np.float32))
            assert np.array_equal(batch["demographics"][i].numpy(),
                                  tables["demo"].loc[stay, list(DEMOGRAPHIC_COLUMNS)].to_numpy(np.float32))
            labels = np.array([np.array(list(p), dtype=np.int64) for p in row["region_labels"]])
            assert np.array_equal(batch["region_labels"][i, : t - 1].numpy(), labels)
            _check_crops(batch, i, list(row["dicom_ids"]), tables["cxr"])
    n = int((tables["mortality_los"]["split"] == split).sum())
    assert n >= 2, f"the fixture should put samples in {split}"
    assert seen == (n - n % 2 if split == "train" else n)  # train yields whole batches of 2 only; eval every sample


def test_progression_round_trip_from_processed(built):
    fx, shards, tables = built
    dp = tables["disease_progression"]
    seen = 0
    for split in ("val", "test"):
        for batch in build_loader(shards, "disease_progression", split, 3, 0):
            for i, stay in enumerate(batch["stay_id"].tolist()):
                rows = dp[(dp.stay_id == stay) & (dp.split == split)]
                hours = batch["cxr_hours"][i].numpy()
                row = rows[np.isclose(rows.cxr1_hours.to_numpy(np.float32), hours[0])].iloc[0]
                assert batch["progression"][i].tolist() == [int(row[d]) for d in DISEASE_SLUGS]
                _check_crops(batch, i, [row["cxr1_dicom_id"], row["cxr2_dicom_id"]], tables["cxr"])
                seen += 1
    assert seen == int(dp.split.isin(["val", "test"]).sum())
