"""The authors' own model, built from their code: records the goldens and checks them (for tests).

The authors' code (github.com/Chenliu-svg/DiPro at 34f8fff, ``models/``) is read from the reference
copy: ``$DIPRO_AUTHORS_CODE`` when that is set (set it empty, or to a folder without their code, to
run as CI does without it), else ``shared/reference/dipro-authors`` beside the checkout; it is
imported, never copied.  What it imports and this machine lacks is stubbed for the time of the import:

* ``pytorch_lightning``: ``LightningModule`` as a plain ``nn.Module`` with a ``device`` (all the
  model's ``forward`` needs), and the callback classes of :func:`authors_golden.lightning_stub_modules`;
* ``mimic_data_extract.mimic3benchmark.constants`` (not in the reference copy): the authors' values,
  with ``IMAGE_SIZE`` set to the goldens' crop size (their 224 in the release);
* ``torchvision.models.resnet50(pretrained=True)``: built without weights (nothing is downloaded).

Recording (``python tests/authors_reference.py --record``, with their code present) writes
``tests/data/authors_golden/<task>.json`` (format: tests/authors_golden.py): the description of their
``state_dict`` taken from their constructor's initialisation, then their model loaded with the tensors
drawn from that description and run at batch 1 on every test sample of the golden shards.
:func:`authors_model_from_golden` rebuilds that model from a golden file, so tests can check that it
still gives the recorded outputs.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: tests/ holds the helper modules

import authors_golden as golden_mod  # noqa: E402
from authors_golden import CROP, TASKS, WIDTH, authors_inputs, dtype_name  # noqa: E402
from helpers import REPO  # noqa: E402

DISEASES = ["atelectasis", "enlarged cardiac silhouette", "consolidation", "pulmonary edema", "lung opacity",
            "pleural effusion", "pneumonia"]  # the authors' PROGRESSION_DISEASE (constants.py), in their order
REGIONS = ["left lung", "right lung", "left lower lung zone", "right lower lung zone", "left hilar structures",
           "right hilar structures", "left costophrenic angle", "right costophrenic angle", "cardiac silhouette",
           "mediastinum"]  # the authors' SELECTED_REGIONS
TASK_MONITOR = {"length_of_stay": "val/accuracy", "disease_progression": "val/f1_macro", "mortality": "val/pr_auc"}
# scripts/experiment.sh's per-task settings (num_transformer_layers); small widths in tests
TASK_LAYERS = {"disease_progression": 2, "mortality": 4, "length_of_stay": 2}
CONSTRUCTOR = dict(lambda_consistency=1.0, lambda_orthogonal=0.1, lambda_static_order=0.5, lambda_dynamic_order=0.1,
                   lambda_CE_loss=6.0, group_num=8, d_model=WIDTH, dropout_rate=0.1)
"""The authors' ``DiPro`` arguments besides task, label path and layers (configs/DiPro.yaml's values)."""
RECORD_SEED = 23
CONSTANT_SPREAD = 0.1
"""The standard deviation drawn for tensors the authors initialise to a constant (see authors_golden)."""
WEIGHT_GAIN = 3 ** 0.5
"""The factor on the init spread of the authors' own weight matrices (outside the ResNet; see authors_golden)."""
FULL_FORMAT_TASK = "mortality"
"""The task whose golden checkpoint is a full Lightning file (the others: weights-only)."""


def reference_root() -> Path | None:
    """The authors' code: ``$DIPRO_AUTHORS_CODE`` when set (empty: none), else
    ``shared/reference/dipro-authors`` beside or in the checkout; None where it is not there."""
    env = os.environ.get("DIPRO_AUTHORS_CODE")
    candidates = [env] if env is not None else [REPO.parent / "shared/reference/dipro-authors",
                                               REPO / "shared/reference/dipro-authors"]
    for c in candidates:
        if c and (Path(c) / "models" / "model.py").is_file():
            return Path(c)
    return None


def reference_commit(root: Path) -> str:
    """The authors' commit the reference copy was taken at (its README says 'at commit XXXXXXX')."""
    m = re.search(r"at commit ([0-9a-f]{7,40})", (root / "README.md").read_text()) if (root / "README.md").is_file() \
        else None
    return m.group(1) if m else "unknown"


class _LightningModule(nn.Module):
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


def _stub_modules(crop_size: int) -> dict[str, types.ModuleType]:
    mods = golden_mod.lightning_stub_modules()
    mods["pytorch_lightning"].LightningModule = _LightningModule

    def module(name: str, **attrs: Any) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        return mod

    constants = module(
        "mimic_data_extract.mimic3benchmark.constants",
        PROGRESSION_DISEASE=DISEASES, SELECTED_REGIONS=REGIONS, FILL_VALUE=3,
        PROGRESSION_DICT={"worsened": 0, "improved": 1, "no change": 2, "not mentioned": 3},
        TASK_OUTPUT_SIZE={"length_of_stay": 4, "disease_progression": 3, "mortality": 1},
        TASK_MONITOR=TASK_MONITOR,
        TASK_NUM_CLASSES={"length_of_stay": 1, "disease_progression": 7, "mortality": 1},
        IMAGE_CHANNEL=3, IMAGE_SIZE=crop_size, VARIABLE_DIM=38, NUM_DEMOGRAPHIC_VAR=17)
    bench = module("mimic_data_extract.mimic3benchmark", constants=constants)
    return {**mods, "mimic_data_extract": module("mimic_data_extract", mimic3benchmark=bench),
            "mimic_data_extract.mimic3benchmark": bench, constants.__name__: constants}


@contextlib.contextmanager
def authors_code(crop_size: int = CROP) -> Iterator[types.ModuleType]:
    """The authors' ``models.model`` module (its ``DiPro``), importable and picklable inside the block;
    their modules and the stubs are gone afterwards (the libraries they import stay loaded, as after
    any import: unloading sklearn or scipy would only make the next entry import them again)."""
    import torchvision

    root = reference_root()
    assert root is not None, "the authors' reference code is not here (see reference_root)"
    stubs = _stub_modules(crop_size)
    tops = {name.split(".")[0] for name in stubs}
    before = set(sys.modules)
    original_resnet50 = torchvision.models.resnet50
    sys.path.insert(0, str(root))
    torchvision.models.resnet50 = lambda pretrained=False, **kw: original_resnet50(weights=None)
    try:
        with golden_mod.stubbed_modules(stubs):
            with contextlib.redirect_stdout(io.StringIO()):  # Component.py prints a parameter count at import
                import models.model as authors_model  # noqa: PLC0415 (the authors' package, from the reference)
            yield authors_model
    finally:
        torchvision.models.resnet50 = original_resnet50
        sys.path.remove(str(root))
        for name in set(sys.modules) - before:
            where = getattr(sys.modules[name], "__file__", None) or ""
            if where.startswith(str(root) + os.sep) or name.split(".")[0] in tops:
                del sys.modules[name]


def write_label_csvs(label_path: Path, mortality: tuple[int, int] = (30, 10)) -> None:
    """The two train.csv files the authors' ``Base_Predictor.setup`` reads for its class weights."""
    import pandas as pd

    names = ["worsened", "improved", "no change", "not mentioned"]
    rows = {d: [names[(i + k) % 4] for i in range(40)] for k, d in enumerate(DISEASES)}
    (label_path / "disease_progression").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(label_path / "disease_progression" / "train.csv", index=False)
    (label_path / "mortality_los").mkdir(parents=True, exist_ok=True)
    neg, pos = mortality
    pd.DataFrame({"mortality_inhospital": [0] * neg + [1] * pos}).to_csv(
        label_path / "mortality_los" / "train.csv", index=False)


_RANDOM_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "orthogonal_")


@contextlib.contextmanager
def _no_random_init() -> Iterator[None]:
    """torch.nn.init's random initialisers as no-ops (a model whose every tensor is then overwritten
    by ``load_state_dict(strict=True)`` need not spend seconds drawing a ResNet-50)."""
    saved = {name: getattr(nn.init, name) for name in _RANDOM_INITS}
    for name in _RANDOM_INITS:
        setattr(nn.init, name, lambda tensor, *a, **kw: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _construct(authors_model: types.ModuleType, task: str, label_path: Path) -> nn.Module:
    return authors_model.DiPro(task_name=task, label_path=str(label_path), num_transformer_layers=TASK_LAYERS[task],
                               **CONSTRUCTOR)


def describe(model: nn.Module) -> list[list[Any]]:
    """The golden ``tensors`` rows of the authors' freshly initialised ``model`` (rules: authors_golden)."""
    params = {name for name, _ in model.named_parameters()}
    rows = []
    for key, t in model.state_dict().items():
        head = [key, list(t.shape), dtype_name(t.dtype), key in params]
        if key.endswith("pos_encoder.pe"):
            expected = golden_mod.sinusoid_table(t.shape[1], t.shape[2])
            assert torch.equal(t, expected), f"{key} is not the sinusoid table authors_golden rebuilds"
            rows.append(head + ["sinusoid"])
        elif not t.is_floating_point() or t.numel() == 1:
            value = t.reshape(-1)[0].item()
            assert torch.all(t == value), f"{key}: a non-float tensor that is not constant"
            rows.append(head + ["const", value])
        else:
            x = t.double()
            mean, std = x.mean().item(), x.std(correction=0).item()
            if std == 0.0:
                std = CONSTANT_SPREAD
            elif t.ndim >= 2 and ".resnet." not in key and std < 0.5:  # not the N(0, 1) tokens and padding
                std *= WEIGHT_GAIN
            rows.append(head + ["uniform", float(f"{mean:.4g}"), float(f"{std:.4g}")])
    return rows


def authors_model_from_golden(authors_model: types.ModuleType, golden: dict[str, Any], label_path: Path,
                              state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The authors' DiPro for the golden's task holding ``state`` (default: the tensors drawn from its
    description with the recorded seed); in eval mode.  Their state dict must have exactly the
    described keys, shapes and dtypes."""
    task = golden["task"]
    with _no_random_init():
        model = _construct(authors_model, task, label_path)
    theirs = model.state_dict()
    described = [(r[0], r[1], r[2]) for r in golden["tensors"]]
    actual = [(k, list(t.shape), dtype_name(t.dtype)) for k, t in theirs.items()]
    assert actual == described, ("the authors' state dict no longer matches the golden description: "
                                 f"{sorted(set(map(str, actual)) ^ set(map(str, described)))[:4]}")
    pe = [k for k in theirs if k.endswith("pos_encoder.pe")]
    for k in pe:  # their constructor computed it: the rebuilt table must be theirs
        assert torch.equal(theirs[k], golden_mod.sinusoid_table(theirs[k].shape[1], theirs[k].shape[2])), k
    if state is None:
        state = golden_mod.draw_state_dict(golden, golden["checkpoint"]["seed"])
    model.load_state_dict(state, strict=True)
    return model.eval()


def authors_outputs(model: nn.Module, task: str, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' model on one sample: its raw output [num_final_class, output_size] and the
    probabilities shaped as this project's ``predict_proba`` of one sample: progression [7,3] softmax,
    mortality [] sigmoid, length of stay [4] softmax."""
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # their torch.cuda.amp.autocast deprecation, CUDA-not-available
            output = model(*authors_inputs(batch))[0][0]
    if task == "mortality":
        return output, torch.sigmoid(output[0, 0])
    if task == "length_of_stay":
        return output, torch.softmax(output[0], dim=-1)
    return output, torch.softmax(output, dim=-1)


# ----------------------------------------------------------------------------- recording

def _floats(t: torch.Tensor) -> list[float]:
    return [float(f"{v:.9g}") for v in t.reshape(-1).tolist()]


def _project_commit() -> str:
    """HEAD of this checkout, marked ``+changes`` when files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout

    try:
        return git("rev-parse", "HEAD").strip() + ("+changes" if git("status", "--porcelain").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _dump(golden: dict[str, Any]) -> str:
    """The golden as JSON with one line per tensor row and per sample (small, readable diffs)."""
    def compact(x: Any) -> str:
        return json.dumps(x, separators=(",", ":"), ensure_ascii=False)

    parts = []
    for key, value in golden.items():
        if key == "tensors":
            body = ",\n".join("  " + compact(r) for r in value)
            parts.append(f' "tensors": [\n{body}\n ]')
        elif key == "samples":
            outputs = value["outputs"]
            rest = {k: v for k, v in value.items() if k != "outputs"}
            body = ",\n".join(f"   {compact(k)}: {compact(v)}" for k, v in outputs.items())
            inner = ", ".join(f"{compact(k)}: {compact(v)}" for k, v in rest.items())
            parts.append(f' "samples": {{{inner},\n  "outputs": {{\n{body}\n  }}}}')
        else:
            parts.append(f" {compact(key)}: {compact(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def record(tasks: tuple[str, ...] = TASKS, out_dir: Path = golden_mod.GOLDEN_DIR) -> list[Path]:
    """Record the goldens of ``tasks`` under ``out_dir`` (the authors' code must be present)."""
    import numpy as np

    from data_sharding.atomic import write_text

    root = reference_root()
    if root is None:
        raise SystemExit("the authors' code is not here: set DIPRO_AUTHORS_CODE to their checkout (its models/)")
    written, commit = [], _project_commit()  # before the first golden is written
    with tempfile.TemporaryDirectory(prefix="authors-golden-") as tmp:
        tmp = Path(tmp)
        write_label_csvs(tmp / "labels")
        shards = golden_mod.make_golden_shards(tmp)
        with authors_code(CROP) as authors_model:
            for task in tasks:
                torch.manual_seed(RECORD_SEED)
                rows = describe(_construct(authors_model, task, tmp / "labels"))
                golden: dict[str, Any] = {
                    "about": "Golden outputs of the authors' DiPro (tests/authors_golden.py documents every field; "
                             "re-record: python tests/authors_reference.py --record)",
                    "task": task,
                    "recorded_with": {"torch": torch.__version__, "numpy": np.__version__,
                                      "python": platform.python_version(),
                                      "authors_code": f"github.com/Chenliu-svg/DiPro {reference_commit(root)}",
                                      "project_commit": commit},
                    "authors_model": {"class": "models/model.py: DiPro", "task_name": task,
                                      "num_transformer_layers": TASK_LAYERS[task], **CONSTRUCTOR,
                                      "image_size": CROP, "monitor": TASK_MONITOR[task],
                                      "label_csvs": "tests/authors_reference.py: write_label_csvs (defaults)",
                                      "described_from": f"their constructor's initialisation, torch.manual_seed"
                                                        f"({RECORD_SEED}); constant tensors drawn with std "
                                                        f"{CONSTANT_SPREAD}; their weight matrices outside the "
                                                        f"ResNet with {WEIGHT_GAIN:.4g} x their init std"},
                    "checkpoint": {"seed": RECORD_SEED, "epoch": 7, "global_step": 280,
                                   "format": "full" if task == FULL_FORMAT_TASK else "weights-only"},
                    "tensors": rows,
                }
                golden["checkpoint"]["state_sha256"] = golden_mod.state_digest(
                    golden_mod.draw_state_dict(golden, RECORD_SEED))
                model = authors_model_from_golden(authors_model, golden, tmp / "labels")
                outputs = {}
                for key, batch in golden_mod.golden_samples(shards, task):
                    logits, probs = authors_outputs(model, task, batch)
                    if not torch.isfinite(logits).all():
                        raise SystemExit(f"{task} {key}: the authors' model gave non-finite outputs")
                    outputs[key] = {"inputs_sha256": golden_mod.inputs_digest(batch), "logits": _floats(logits),
                                    "probabilities": _floats(probs)}
                golden["samples"] = {"fixture": f"processed_fixture.make_training_shards(root, crop_size={CROP})",
                                     "split": "test", "order": "manifest (dipro.train.data.eval_loader)",
                                     "batch_size": 1, "outputs": outputs}
                path = out_dir / f"{task}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text(path, _dump(golden))
                spread = np.std([o["probabilities"] for o in outputs.values()], axis=0).max()
                print(f"{path}: {len(rows)} tensors, {len(outputs)} samples, largest spread of a probability "
                      f"across samples {spread:.3g}")
                written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="(re)record tests/data/authors_golden/<task>.json")
    parser.add_argument("--task", choices=TASKS, action="append", help="only this task (repeatable)")
    parser.add_argument("--out", type=Path, default=golden_mod.GOLDEN_DIR, help="where the goldens go")
    args = parser.parse_args(argv)
    if not args.record:
        parser.error("nothing to do: pass --record")
    record(tuple(args.task or TASKS), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
