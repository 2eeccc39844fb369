"""The registered model: an MLflow pyfunc that rebuilds DiPro from its config and a plain state dict.

Logged as *models from code* (``python_model`` = the file
:mod:`dipro.tracking.model_code`), with the ``dipro`` and ``data_sharding``
sources as ``code_paths`` and three artifacts: ``config.yaml``,
``label_stats.json`` and ``model.pt`` (float32 state dict).  Loading runs
``build_model(cfg, label_stats)`` and ``torch.load(weights_only=True)``:
no pickled object is stored or unpickled anywhere.

Input (one row per sample; docs/serving.md has a request example).  Each
array column is a base64-encoded ``.npy`` file (``numpy.save``, no pickle),
the same arrays as the shard members of docs/ARCHITECTURE.md section 2:

=================  =========================================================
column             array
=================  =========================================================
crops              uint8 [T, 10, C, C] region crops (C = the model's crop size)
region_present     uint8 [T, 10] (1 = the region was cropped)
cxr_hours          float32 [T], hours since ICU admission
ehr_values         float32 [L, 38] (z-scored with the training statistics)
ehr_masks          uint8 [L, 38] (1 = observed)
ehr_hours          float32 [L]
demographics       float32 [17]
sample_key         optional string, copied to the output
=================  =========================================================

Output: one row per input row: ``sample_key`` and per-task probabilities
(:func:`probability_columns`), plus the predicted class.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np

from data_sharding.constants import (
    DISEASE_SLUGS,
    NOT_MENTIONED,
    NUM_DEMOGRAPHICS,
    NUM_DISEASES,
    NUM_EHR_VARIABLES,
    NUM_LOS_BINS,
    NUM_REGIONS,
    TASK_TO_SHARD_DIR,
)
from data_sharding.errors import DataError
from data_sharding.shard_format import ARRAYS, INPUT_ARRAYS, json_bytes, load_npy, npy_bytes

from mlflow.pyfunc import PythonModel

ARRAY_COLUMNS = INPUT_ARRAYS
"""The request's array columns: the shard sample's arrays but the region labels (data_sharding.shard_format)."""
ARTIFACT_KEYS = ("config", "label_stats", "weights")
PROGRESSION_CLASS_SLUGS = ("worsened", "improved", "no_change")
DEFAULT_BATCH_SIZE = 8


# ----------------------------------------------------------------------------- encoding
def encode_array(arr: np.ndarray) -> str:
    """Base64 of ``numpy.save(arr, allow_pickle=False)`` (the request's array encoding)."""
    return base64.b64encode(npy_bytes(arr)).decode("ascii")


def encode_sample(sample: dict[str, Any], sample_key: str | None = None) -> dict[str, str]:
    """A request row from a sample's arrays (e.g. a decoded shard sample)."""
    row = {c: encode_array(np.asarray(sample[c])) for c in ARRAY_COLUMNS}
    key = sample_key if sample_key is not None else sample.get("sample_key")
    if key is not None:
        row["sample_key"] = str(key)
    return row


def _decode_bytes(value: Any, column: str, row: int) -> bytes:
    if not isinstance(value, str):
        raise DataError(f"input row {row}, column {column!r}: expected a base64-encoded .npy string, "
                        f"got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, TypeError) as exc:
        raise DataError(f"input row {row}, column {column!r}: not valid base64 ({exc})") from None


def dataframe_to_samples(df: Any, task: str, crop_size: int | None = None) -> list[dict[str, Any]]:
    """Rows of the documented input frame -> validated samples for :func:`dipro.data.collate`.

    Every array is checked like a shard sample (:func:`dipro.data.decode.decode_sample`):
    dtype, shape, value range; a bad row raises :class:`DataError` naming the row and column.
    Labels are not inputs: neutral placeholders fill the label fields that collate expects.
    """
    from dipro.data.decode import decode_sample

    missing = [c for c in ARRAY_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"model input lacks column(s) {', '.join(missing)}; expected {', '.join(ARRAY_COLUMNS)} "
                        "(base64 .npy each), optional sample_key")
    task_dir = TASK_TO_SHARD_DIR[task]
    labels = ({"progression": [NOT_MENTIONED] * NUM_DISEASES} if task_dir == "disease_progression"
              else {"mortality": 0, "los_bin": 0, "los_days": 0.0})
    samples = []
    for i, rec in enumerate(df.to_dict(orient="records")):
        key = str(rec["sample_key"]) if rec.get("sample_key") not in (None, "") else f"row{i}"
        raw: dict[str, Any] = {"__key__": key, "__shard__": f"request row {i}"}
        for c in ARRAY_COLUMNS:
            raw[f"{c}.npy"] = _decode_bytes(rec[c], c, i)
        t = _leading_dim(raw["crops.npy"])
        raw["region_labels.npy"] = npy_bytes(np.full((max(t - 1, 0), NUM_REGIONS, NUM_DISEASES), NOT_MENTIONED,
                                                     dtype=ARRAYS["region_labels.npy"].dtype))
        raw["labels.json"] = json_bytes(labels)
        raw["meta.json"] = json_bytes({"stay_id": -1, "subject_id": -1})
        samples.append(decode_sample(raw, task_dir, crop_size))
    return samples


def _leading_dim(npy: bytes) -> int:
    try:
        arr = load_npy(npy)
    except Exception:
        return 0  # decode_sample reports the unreadable member with its name
    return int(arr.shape[0]) if arr.ndim else 0


# ----------------------------------------------------------------------------- outputs
def probability_columns(task: str) -> list[str]:
    """Output probability columns: mortality ``prob_died``; LOS ``prob_los_bin_{k}``;
    progression ``{disease}_prob_{worsened|improved|no_change}``."""
    if task == "mortality":
        return ["prob_died"]
    if task == "length_of_stay":
        return [f"prob_los_bin_{k}" for k in range(NUM_LOS_BINS)]
    return [f"{d}_prob_{c}" for d in DISEASE_SLUGS for c in PROGRESSION_CLASS_SLUGS]


def predicted_columns(task: str) -> list[str]:
    """mortality / LOS: ``predicted`` (0/1 at 0.5, argmax bin); progression ``{disease}_predicted``
    (0 worsened, 1 improved, 2 no change)."""
    if task == "disease_progression":
        return [f"{d}_predicted" for d in DISEASE_SLUGS]
    return ["predicted"]


def probabilities_frame(task: str, probs: np.ndarray, sample_keys: list[str]) -> Any:
    """``predict_proba`` output -> DataFrame with ``sample_key``, probability and predicted columns."""
    import pandas as pd

    probs = np.asarray(probs, dtype=np.float64)
    n = probs.shape[0]
    cols: dict[str, Any] = {"sample_key": list(sample_keys)}
    if task == "mortality":
        cols["prob_died"] = probs.reshape(n)
        cols["predicted"] = (probs.reshape(n) >= 0.5).astype(np.int64)
    elif task == "length_of_stay":
        for k, name in enumerate(probability_columns(task)):
            cols[name] = probs[:, k]
        cols["predicted"] = probs.argmax(1).astype(np.int64)
    else:
        names = iter(probability_columns(task))
        for d in range(NUM_DISEASES):
            for c in range(len(PROGRESSION_CLASS_SLUGS)):
                cols[next(names)] = probs[:, d, c]
        for d, name in enumerate(predicted_columns(task)):
            cols[name] = probs[:, d].argmax(-1).astype(np.int64)
    return pd.DataFrame(cols)


# ----------------------------------------------------------------------------- network
def load_network(config_path: str | Path, label_stats_path: str | Path, weights_path: str | Path,
                 device: str = "cpu") -> tuple[Any, Any]:
    """Rebuild DiPro from ``config.yaml`` + ``label_stats.json`` and load ``model.pt`` (weights_only)."""
    import torch

    from dipro.config import load_config
    from dipro.model import build_model

    cfg = load_config(config_path)
    try:
        label_stats = json.loads(Path(label_stats_path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read label statistics {label_stats_path}: {exc}") from None
    model = build_model(cfg, label_stats, load_pretrained=False)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    return model, cfg


def predict_batch(model: Any, batch: dict[str, Any], device: str = "cpu") -> np.ndarray:
    """``predict_proba(model(batch))`` as float64 numpy, without gradients."""
    import torch

    from dipro.data import move_to_device

    with torch.inference_mode():
        out = model(move_to_device(batch, device))
        return model.predict_proba(out).float().cpu().numpy().astype(np.float64)


def predict_samples(model: Any, cfg: Any, samples: list[dict[str, Any]], batch_size: int = DEFAULT_BATCH_SIZE,
                    device: str = "cpu") -> np.ndarray:
    """Probabilities for decoded samples, in order (CXR selection as the evaluation loader does)."""
    from dipro.data import collate
    from dipro.data.decode import select_cxrs

    task_dir = TASK_TO_SHARD_DIR[cfg.task]
    chunks = []
    for i in range(0, len(samples), batch_size):
        part = [select_cxrs(s, cfg.data.max_cxrs, cfg.model.last_cxr_only) for s in samples[i:i + batch_size]]
        chunks.append(predict_batch(model, collate(part, task_dir), device))
    if not chunks:
        raise DataError("model input has no rows")
    return np.concatenate(chunks, axis=0)


class DiProPyfunc(PythonModel):
    """``mlflow.pyfunc`` wrapper: DataFrame of base64 .npy arrays -> per-task probabilities."""

    def __init__(self) -> None:
        self.model = None
        self.cfg = None
        self.device = "cpu"

    def load_context(self, context):
        arts = context.artifacts
        missing = [k for k in ARTIFACT_KEYS if k not in arts]
        if missing:
            raise DataError(f"model artifacts lack {', '.join(missing)}; expected {', '.join(ARTIFACT_KEYS)}")
        self.model, self.cfg = load_network(arts["config"], arts["label_stats"], arts["weights"], self.device)

    @property
    def task(self) -> str:
        return self.cfg.task

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would infer a schema from them
        import pandas as pd

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        batch_size = int((params or {}).get("batch_size", DEFAULT_BATCH_SIZE))
        samples = dataframe_to_samples(df, self.cfg.task, self.cfg.model.crop_size)
        probs = predict_samples(self.model, self.cfg, samples, batch_size, self.device)
        return probabilities_frame(self.cfg.task, probs, [s["sample_key"] for s in samples])


# ----------------------------------------------------------------------------- synthetic example
def synthetic_input_example(crop_size: int, num_rows: int = 2, seed: int = 0) -> Any:
    """An input frame generated from random numbers (never from the user's records: MIMIC's DUA)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_rows):
        t, steps = 2 + i % 2, 6
        present = (rng.random((t, NUM_REGIONS)) > 0.1).astype(np.uint8)
        crops = rng.integers(0, 256, (t, NUM_REGIONS, crop_size, crop_size), dtype=np.uint8)
        crops[present == 0] = 0
        cxr_hours = np.sort(rng.uniform(0, 48, t)).astype(np.float32)
        sample = {
            "crops": crops,
            "region_present": present,
            "cxr_hours": cxr_hours,
            "ehr_values": rng.standard_normal((steps, NUM_EHR_VARIABLES)).astype(np.float32),
            "ehr_masks": (rng.random((steps, NUM_EHR_VARIABLES)) < 0.3).astype(np.uint8),
            "ehr_hours": np.arange(steps, dtype=np.float32),
            "demographics": rng.standard_normal(NUM_DEMOGRAPHICS).astype(np.float32),
        }
        rows.append(encode_sample(sample, sample_key=f"synthetic-{i}"))
    return pd.DataFrame(rows)


def model_signature(task: str, example: Any, output: Any) -> Any:
    """Input: the array columns (string, required) + optional sample_key; output inferred."""
    from mlflow.models import ModelSignature
    from mlflow.models.signature import infer_signature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", c) for c in ARRAY_COLUMNS]
                    + [ColSpec("string", "sample_key", required=False)])
    outputs = infer_signature(example[list(ARRAY_COLUMNS)], output).outputs
    return ModelSignature(inputs=inputs, outputs=outputs)
