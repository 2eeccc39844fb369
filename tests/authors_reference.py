"""The authors' own model, built from their code, and checkpoints in their release's format (for tests).

The authors' code (github.com/Chenliu-svg/DiPro at 34f8fff, ``models/``) is read from the reference
copy next to the checkouts (``../shared/reference/dipro-authors``, or ``$DIPRO_AUTHORS_CODE``); it is
imported, never copied. What it imports and this machine lacks is stubbed for the time of the import:

* ``pytorch_lightning``: ``LightningModule`` as a plain ``nn.Module`` with a ``device`` (all the
  model's ``forward`` needs), and the two callback classes whose *classes* key a Lightning 1.4.2
  checkpoint's ``callbacks`` dict (``callbacks.model_checkpoint.ModelCheckpoint``,
  ``callbacks.early_stopping.EarlyStopping``), so a checkpoint pickled here names the same globals;
* ``mimic_data_extract.mimic3benchmark.constants`` (not in the reference copy): the authors' values,
  with ``IMAGE_SIZE`` set to the tests' crop size (their 224 in the release);
* ``torchvision.models.resnet50(pretrained=True)``: built without weights (nothing is downloaded).

:func:`lightning_checkpoint` is Lightning 1.4.2's ``dump_checkpoint`` of such a model (epoch, step,
version, state_dict, callbacks keyed by class, AdamW and CosineAnnealingLR states);
:func:`authors_probabilities` runs the authors' forward on one sample of this project's loader.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from helpers import REPO

DISEASES = ["atelectasis", "enlarged cardiac silhouette", "consolidation", "pulmonary edema", "lung opacity",
            "pleural effusion", "pneumonia"]  # the authors' PROGRESSION_DISEASE (constants.py), in their order
REGIONS = ["left lung", "right lung", "left lower lung zone", "right lower lung zone", "left hilar structures",
           "right hilar structures", "left costophrenic angle", "right costophrenic angle", "cardiac silhouette",
           "mediastinum"]  # the authors' SELECTED_REGIONS
LIGHTNING_VERSION = "1.4.2"
# scripts/experiment.sh's per-task settings (d_model, num_transformer_layers); small widths in tests
TASK_LAYERS = {"disease_progression": 2, "mortality": 4, "length_of_stay": 2}


def reference_root() -> Path | None:
    """The authors' code: ``$DIPRO_AUTHORS_CODE``, else ``shared/reference/dipro-authors`` beside or in the checkout."""
    candidates = [os.environ.get("DIPRO_AUTHORS_CODE"), REPO.parent / "shared/reference/dipro-authors",
                  REPO / "shared/reference/dipro-authors"]
    for c in candidates:
        if c and (Path(c) / "models" / "model.py").is_file():
            return Path(c)
    return None


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


class _LightningModule(nn.Module):
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


def _stub_modules(crop_size: int) -> dict[str, types.ModuleType]:
    mc = _module("pytorch_lightning.callbacks.model_checkpoint")
    es = _module("pytorch_lightning.callbacks.early_stopping")
    mc.ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": mc.__name__})
    es.EarlyStopping = type("EarlyStopping", (), {"__module__": es.__name__})
    callbacks = _module("pytorch_lightning.callbacks", model_checkpoint=mc, early_stopping=es,
                        ModelCheckpoint=mc.ModelCheckpoint, EarlyStopping=es.EarlyStopping)
    pl = _module("pytorch_lightning", LightningModule=_LightningModule, callbacks=callbacks,
                 __version__=LIGHTNING_VERSION)
    constants = _module(
        "mimic_data_extract.mimic3benchmark.constants",
        PROGRESSION_DISEASE=DISEASES, SELECTED_REGIONS=REGIONS, FILL_VALUE=3,
        PROGRESSION_DICT={"worsened": 0, "improved": 1, "no change": 2, "not mentioned": 3},
        TASK_OUTPUT_SIZE={"length_of_stay": 4, "disease_progression": 3, "mortality": 1},
        TASK_MONITOR={"length_of_stay": "val/accuracy", "disease_progression": "val/f1_macro",
                      "mortality": "val/pr_auc"},
        TASK_NUM_CLASSES={"length_of_stay": 1, "disease_progression": 7, "mortality": 1},
        IMAGE_CHANNEL=3, IMAGE_SIZE=crop_size, VARIABLE_DIM=38, NUM_DEMOGRAPHIC_VAR=17)
    bench = _module("mimic_data_extract.mimic3benchmark", constants=constants)
    return {"pytorch_lightning": pl, "pytorch_lightning.callbacks": callbacks, mc.__name__: mc, es.__name__: es,
            "mimic_data_extract": _module("mimic_data_extract", mimic3benchmark=bench),
            "mimic_data_extract.mimic3benchmark": bench, constants.__name__: constants}


@contextlib.contextmanager
def authors_code(crop_size: int) -> Iterator[types.ModuleType]:
    """The authors' ``models.model`` module (its ``DiPro``), importable and picklable inside the block;
    every module it added is gone afterwards."""
    import torchvision

    root = reference_root()
    assert root is not None, "the authors' reference code is not here (see reference_root)"
    before = set(sys.modules)
    stubs = _stub_modules(crop_size)
    original_resnet50 = torchvision.models.resnet50
    sys.modules.update(stubs)
    sys.path.insert(0, str(root))
    torchvision.models.resnet50 = lambda pretrained=False, **kw: original_resnet50(weights=None)
    try:
        import contextlib as _c
        import io

        with _c.redirect_stdout(io.StringIO()):  # Component.py prints a parameter count at import
            import models.model as authors_model  # noqa: PLC0415 (the authors' package, from the reference)
        yield authors_model
    finally:
        torchvision.models.resnet50 = original_resnet50
        sys.path.remove(str(root))
        for name in set(sys.modules) - before:
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


def build_authors_model(authors_model: types.ModuleType, task: str, label_path: Path, d_model: int,
                        seed: int) -> nn.Module:
    """The authors' DiPro for ``task`` (their constructor, random weights) with BatchNorm statistics
    drawn at random too, so that evaluation-mode BatchNorm is not the identity; in eval mode."""
    torch.manual_seed(seed)
    model = authors_model.DiPro(task_name=task, label_path=str(label_path), lambda_consistency=1.0,
                                lambda_orthogonal=0.1, lambda_static_order=0.5, lambda_dynamic_order=0.1,
                                lambda_CE_loss=6.0, num_transformer_layers=TASK_LAYERS[task], group_num=8,
                                d_model=d_model, dropout_rate=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            m.num_batches_tracked.fill_(100)
    return model.eval()


def lightning_checkpoint(model: nn.Module, epoch: int = 7, global_step: int = 280) -> dict[str, Any]:
    """What Lightning 1.4.2's ``CheckpointConnector.dump_checkpoint`` writes for the authors' run."""
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint  # the stubs, inside authors_code

    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=1.6e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100, eta_min=1e-7)
    return {
        "epoch": epoch,
        "global_step": global_step,
        "pytorch-lightning_version": LIGHTNING_VERSION,
        "state_dict": model.state_dict(),
        "callbacks": {
            ModelCheckpoint: {"monitor": model.monitor, "best_model_score": torch.tensor(0.4321),
                              "best_model_path": f"logs/checkpoints/epoch={epoch:06d}.ckpt",
                              "current_score": torch.tensor(0.4), "dirpath": "logs/checkpoints"},
            EarlyStopping: {"wait_count": 3, "stopped_epoch": 0, "best_score": torch.tensor(0.4321), "patience": 10},
        },
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
    }


def authors_inputs(batch: dict[str, Any]) -> tuple:
    """One sample of this project's loader as the authors' ``DiPro.forward`` arguments (their collate's
    tuple: EHR values and step mask, RGB crops in [0, 1] and CXR mask, demographics, region labels,
    EHR hours, CXR intervals [P, 2])."""
    assert batch["crops"].shape[0] == 1, "the authors' outputs are taken at batch 1"
    crops = batch["crops"].float() / 255.0  # [1,T,R,C,C]: ToTensor of the gray crop
    rgb = crops.unsqueeze(3).expand(-1, -1, -1, 3, -1, -1).contiguous()  # Image.convert('RGB')
    hours = batch["cxr_hours"].float()
    intervals = torch.stack([hours[:, :-1], hours[:, 1:]], dim=-1)
    return (batch["ehr_values"].float(), batch["ehr_mask"].bool(), rgb, batch["cxr_mask"].bool(),
            batch["demographics"].float(), batch["region_labels"].long(), batch["ehr_hours"].float(), intervals)


def authors_probabilities(model: nn.Module, task: str, batch: dict[str, Any]) -> torch.Tensor:
    """The authors' model's probabilities for one sample, shaped as this project's ``predict_proba``
    of one sample: progression [7,3] softmax, mortality [] sigmoid, length of stay [4] softmax."""
    with torch.no_grad():
        output = model(*authors_inputs(batch))[0][0]  # [num_final_class, output_size]
    if task == "mortality":
        return torch.sigmoid(output[0, 0])
    if task == "length_of_stay":
        return torch.softmax(output[0], dim=-1)
    return torch.softmax(output, dim=-1)


def weights_only_checkpoint(model: nn.Module, epoch: int = 7, global_step: int = 280) -> dict[str, Any]:
    """Lightning 1.4.2's ``dump_checkpoint(weights_only=True)``: counters and the state dict only."""
    return {"epoch": epoch, "global_step": global_step, "pytorch-lightning_version": LIGHTNING_VERSION,
            "state_dict": model.state_dict()}
