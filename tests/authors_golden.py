"""Golden outputs of the authors' model, and checkpoints in their release's format, without their code.

``tests/data/authors_golden/<task>.json`` (recorded once with the authors' code present:
``python tests/authors_reference.py --record``) holds, for each task:

* ``tensors``: the authors' ``state_dict`` in its order, one row per key: ``[key, shape, dtype,
  is_parameter, rule, *args]``, from which :func:`draw_state_dict` rebuilds every tensor with one
  ``torch.Generator`` (CPU, seeded) drawn in row order.  Rules:

  - ``["uniform", mean, std]``: ``torch.rand(shape, generator=g).mul_(2 sqrt(3) std).add_(mean -
    sqrt(3) std)`` (float32): a uniform draw with that mean and standard deviation.  The recorder
    takes both from the authors' own initialisation of the tensor, with two changes that make every output depend
    clearly on every weight and input: a spread of 0.1 where that initialisation is a constant
    (LayerNorm / BatchNorm affine and running statistics, attention biases), so that no two tensors
    hold the same values; and sqrt(3) times the spread of their own weight matrices (outside the
    ResNet: PyTorch's default Linear init has std 1/sqrt(3 fan_in), which shrinks activations layer
    after layer until the outputs hardly differ between samples).  With that, each of a list of
    deliberately wrong mappings tried (k and v of the interval attention swapped, a BatchNorm's
    weight and bias swapped, conv1 summed over two channels, EHR or demographic columns reordered,
    two layers or two norms exchanged, a CLS token zeroed) moved some probability by 1e-3 or more,
    ten times the tolerance, while the correct import is within 1e-7;
  - ``["const", value]``: every element ``value`` (scalars: ``num_batches_tracked``, the mortality
    ``pos_weight``, ``temperature``, ``sigma``, one-element biases); draws nothing;
  - ``["sinusoid"]``: the authors' fixed positional table (``models/Component.py:
    PositionalEncoding``, [1, max_len, d_model]); draws nothing.

* ``checkpoint``: the draw seed, :func:`state_digest` of the drawn state dict, and the file format
  (``full``: Lightning 1.4.2's ``dump_checkpoint`` with callbacks keyed by class, AdamW and
  CosineAnnealingLR states; ``weights-only``), epoch and step;
* ``samples``: how the inputs are made (``processed_fixture.make_training_shards`` at the recorded
  crop size, the test split in manifest order, batch 1) and, per sample key, the sha256 of the
  authors' forward inputs (:func:`inputs_digest`), their model's raw output (``logits``,
  [num_final_class, output_size] flattened) and its probabilities in the order of ``dipro
  predict``'s probability columns (``probabilities``);
* ``recorded_with``: torch, numpy and Python versions, the authors' commit, this project's commit.

The tests rebuild the checkpoint from this description, import it and compare `dipro predict` with
the recorded probabilities (no authors' code, no network); where the authors' code is present,
their model (tests/authors_reference.py), loaded from the same description, must still give the
recorded outputs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import torch

from helpers import REPO

GOLDEN_DIR = REPO / "tests" / "data" / "authors_golden"
TASKS = ("disease_progression", "mortality", "length_of_stay")
CROP, WIDTH = 16, 32
"""The recorded models' crop size and d_model: 16 px, the smallest crops a ResNet-50 takes (the
suite's time); the authors' per-task layer counts (scripts/experiment.sh), 8 groups."""
LIGHTNING_VERSION = "1.4.2"
_SQRT3 = math.sqrt(3.0)
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64, "bool": torch.bool}


def golden_path(task: str) -> Path:
    return GOLDEN_DIR / f"{task}.json"


def load_golden(task: str) -> dict[str, Any]:
    """The recorded description and outputs for ``task``."""
    return json.loads(golden_path(task).read_text())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sinusoid_table(max_len: int, d_model: int) -> torch.Tensor:
    """The authors' positional table (models/Component.py: PositionalEncoding.__init__), [1, max_len, d]:
    ``pe[0, p, 2i] = sin(p * w_i)``, ``pe[0, p, 2i+1] = cos(p * w_i)``, ``w_i = exp(2i * -ln(10000) / d)``,
    computed with the same operations in the same dtypes (int64 positions times float32 rates)."""
    position = torch.arange(max_len).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(1, max_len, d_model)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


def draw_state_dict(golden: dict[str, Any], seed: int) -> "OrderedDict[str, torch.Tensor]":
    """Every tensor of the described state dict, drawn in row order from one CPU generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape, dtype, _is_param, rule, *args in golden["tensors"]:
        dt = _DTYPES[dtype]
        if rule == "uniform":
            mean, std = args
            t = torch.rand(shape, generator=g, dtype=torch.float32)
            t = t.mul_(2.0 * _SQRT3 * std).add_(mean - _SQRT3 * std).to(dt)
        elif rule == "const":
            t = torch.full(shape, args[0], dtype=dt)
        elif rule == "sinusoid":
            t = sinusoid_table(shape[1], shape[2]).to(dt)
        else:
            raise ValueError(f"{key}: unknown rule {rule!r} in the golden description")
        if list(t.shape) != list(shape):
            raise ValueError(f"{key}: rule {rule} made shape {list(t.shape)}, the description says {shape}")
        out[key] = t
    return out


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict: each key, dtype, shape and bytes, in order (the checkpoint section's
    ``state_sha256``: the rebuilt tensors are the recorded ones)."""
    h = hashlib.sha256()
    for key, t in state.items():
        t = t.detach().contiguous()
        h.update(f"{key};{dtype_name(t.dtype)}{list(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def parameter_keys(golden: dict[str, Any]) -> list[str]:
    """The keys that are ``nn.Parameter``s of the authors' model, in ``model.parameters()`` order."""
    return [row[0] for row in golden["tensors"] if row[3]]


# ----------------------------------------------------------------------------- Lightning 1.4.2's file format

def lightning_stub_modules() -> dict[str, types.ModuleType]:
    """``pytorch_lightning`` with the two callback classes whose *classes* key a Lightning 1.4.2
    checkpoint's ``callbacks`` dict, under their real module names (so a checkpoint pickled while they
    are in ``sys.modules`` names the same globals as the authors' files)."""
    def module(name: str, **attrs: Any) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        return mod

    mc = module("pytorch_lightning.callbacks.model_checkpoint")
    es = module("pytorch_lightning.callbacks.early_stopping")
    mc.ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": mc.__name__})
    es.EarlyStopping = type("EarlyStopping", (), {"__module__": es.__name__})
    callbacks = module("pytorch_lightning.callbacks", model_checkpoint=mc, early_stopping=es,
                       ModelCheckpoint=mc.ModelCheckpoint, EarlyStopping=es.EarlyStopping)
    pl = module("pytorch_lightning", callbacks=callbacks, __version__=LIGHTNING_VERSION)
    return {"pytorch_lightning": pl, callbacks.__name__: callbacks, mc.__name__: mc, es.__name__: es}


@contextlib.contextmanager
def stubbed_modules(modules: dict[str, types.ModuleType]) -> Iterator[None]:
    """``modules`` in ``sys.modules`` inside the block (those names restored afterwards)."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


def lightning_checkpoint(state: dict[str, torch.Tensor], params: list[str], monitor: str, callbacks: types.ModuleType,
                         epoch: int = 7, global_step: int = 280) -> dict[str, Any]:
    """What Lightning 1.4.2's ``CheckpointConnector.dump_checkpoint`` writes for the authors' run:
    counters, version, ``state``, callbacks keyed by class (``callbacks``: the stub module), and the
    ``state_dict()`` of their AdamW over ``params`` and of their CosineAnnealingLR
    (models/Base_Predictor.py: ``configure_optimizers``; T_max = max_epochs 100) as torch 1.9 (their
    era) lays them out.  The moments are what one step with zero gradients leaves (step 1, both
    zero), written out directly: constructing a torch optimizer here would import torch's compiler
    stack (seconds) for state the import never reads."""
    lr = 1.6e-4
    optimizer = {
        "state": {i: {"step": 1, "exp_avg": torch.zeros_like(state[k]), "exp_avg_sq": torch.zeros_like(state[k])}
                  for i, k in enumerate(params)},
        "param_groups": [{"lr": lr, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.01, "amsgrad": False,
                          "initial_lr": lr, "params": list(range(len(params)))}],
    }
    scheduler = {"T_max": 100, "eta_min": 1e-07, "base_lrs": [lr], "last_epoch": epoch, "_step_count": epoch + 1,
                 "verbose": False, "_get_lr_called_within_step": False,
                 "_last_lr": [1e-07 + (lr - 1e-07) * (1 + math.cos(math.pi * epoch / 100)) / 2]}
    return {
        "epoch": epoch,
        "global_step": global_step,
        "pytorch-lightning_version": LIGHTNING_VERSION,
        "state_dict": state,
        "callbacks": {
            callbacks.ModelCheckpoint: {"monitor": monitor, "best_model_score": torch.tensor(0.4321),
                                        "best_model_path": f"logs/checkpoints/epoch={epoch:06d}.ckpt",
                                        "current_score": torch.tensor(0.4), "dirpath": "logs/checkpoints"},
            callbacks.EarlyStopping: {"wait_count": 3, "stopped_epoch": 0, "best_score": torch.tensor(0.4321),
                                      "patience": 10},
        },
        "optimizer_states": [optimizer],
        "lr_schedulers": [scheduler],
    }


def weights_only_checkpoint(state: dict[str, torch.Tensor], epoch: int = 7, global_step: int = 280) -> dict[str, Any]:
    """Lightning 1.4.2's ``dump_checkpoint(weights_only=True)``: counters and the state dict only."""
    return {"epoch": epoch, "global_step": global_step, "pytorch-lightning_version": LIGHTNING_VERSION,
            "state_dict": state}


def write_authors_checkpoint(path: Path, golden: dict[str, Any], seed: int | None = None,
                             fmt: str | None = None) -> "OrderedDict[str, torch.Tensor]":
    """The authors'-format ``.ckpt`` of the described model drawn with ``seed`` (default: the recorded
    one) in format ``fmt`` (default: the recorded one), as ``torch.save`` writes it; returns the state dict."""
    ck = golden["checkpoint"]
    state = draw_state_dict(golden, ck["seed"] if seed is None else seed)
    fmt = fmt or ck["format"]
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "weights-only":
        torch.save(weights_only_checkpoint(state, ck["epoch"], ck["global_step"]), path)
    elif fmt == "full":
        stubs = lightning_stub_modules()
        with stubbed_modules(stubs):
            torch.save(lightning_checkpoint(state, parameter_keys(golden), golden["authors_model"]["monitor"],
                                            stubs["pytorch_lightning.callbacks"], ck["epoch"], ck["global_step"]),
                       path)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    return state


# ----------------------------------------------------------------------------- the samples

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


def inputs_digest(batch: dict[str, Any]) -> str:
    """sha256 of the authors' forward inputs for one sample (dtype, shape and bytes of each)."""
    h = hashlib.sha256()
    for t in authors_inputs(batch):
        t = t.contiguous()
        h.update(f"{dtype_name(t.dtype)}{list(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def golden_samples(shards: Path, task: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(sample key, batch of one) for the recorded split of ``shards``, in manifest order."""
    from dipro.config import load_config
    from dipro.train.data import eval_loader
    from helpers import config_path

    cfg = load_config(config_path(task), [f"data.shards={shards}", f"model.crop_size={CROP}",
                                          f"model.d_model={WIDTH}", "data.num_loader_workers=0"])
    for batch in eval_loader(cfg, "test", rank=0, world_size=1, batch_size=1, num_workers=0):
        yield batch["sample_key"][0], batch


def make_golden_shards(root: Path) -> Path:
    """The shards the goldens were recorded on (the training tests' 24-stay cohort at :data:`CROP` px)."""
    from processed_fixture import make_training_shards

    return make_training_shards(root, CROP)
