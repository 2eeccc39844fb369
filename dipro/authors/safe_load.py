"""Read the authors' PyTorch Lightning 1.4.2 checkpoints without running anything from the file.

What such a file is (github.com/Chenliu-svg/DiPro ``requirements.txt`` pins pytorch_lightning 1.4.2;
their ``models/Base_Predictor.py: init_from_ckpt`` reads ``torch.load(path)["state_dict"]``):
Lightning's ``dump_checkpoint`` dict written by ``torch.save`` -- ``epoch``, ``global_step``,
``pytorch-lightning_version``, ``state_dict`` (the LightningModule's keys, no prefix),
``callbacks`` keyed by the pickled *classes*
``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` and
``pytorch_lightning.callbacks.early_stopping.EarlyStopping``, ``optimizer_states`` (AdamW) and
``lr_schedulers`` (CosineAnnealingLR); no ``hyper_parameters``.  A weights-only file holds the
same dict without callbacks, optimizer and schedulers.

A plain ``torch.load`` on torch 2.14 refuses a full file (``Unsupported global: ...EarlyStopping``)
and ``weights_only=False`` would unpickle whatever a downloaded file names.  Here the file goes
through torch's restricted (weights-only) unpickler, which rebuilds tensors and plain containers
and calls nothing else, with exactly the two Lightning classes above allowed as *inert stubs*
(:class:`LightningStub`: no methods, never instantiated -- the pickle only uses them as dict
keys).  Before that, every global the pickle names is listed statically
(``torch.serialization.get_unsafe_globals_in_checkpoint``); any other global (``posix.system``,
a model class, ...) is refused with one line naming it, before a single opcode runs (a file that is
not a zip archive -- torch's legacy format or a bare pickle -- is disassembled with :mod:`pickletools`).

Every failure is one :class:`~data_sharding.errors.DataError` line naming the file: missing,
truncated (a zip archive without its central directory), not a torch checkpoint, a refused
global, no ``state_dict``, or a ``state_dict`` that is not a mapping of names to tensors.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from data_sharding.errors import DataError

LIGHTNING_CLASSES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
)
"""The only non-torch globals an authors' checkpoint names (the ``callbacks`` dict's keys)."""
_ZIP_MAGIC = b"PK\x03\x04"
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+)")


class LightningStub:
    """An inert stand-in for a Lightning class that a checkpoint names as a dict key: it has no
    behaviour and is never instantiated; its ``full_name`` says which class it stands for."""

    full_name = ""


def _stub(full_name: str) -> type:
    module, _, name = full_name.rpartition(".")
    return type(name, (LightningStub,), {"__module__": module, "__qualname__": name, "full_name": full_name,
                                         "__doc__": f"Inert stand-in for {full_name} (see LightningStub)."})


STUBS = {name: _stub(name) for name in LIGHTNING_CLASSES}


@dataclass
class AuthorsFile:
    """What was read from one file."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    kind: str
    """``full`` (Lightning checkpoint with callbacks/optimizer), ``weights-only`` (Lightning, state dict
    and counters only) or ``state dict`` (a bare mapping of names to tensors)."""
    sha256: str
    size: int
    info: dict[str, Any] = field(default_factory=dict)
    """epoch, global_step, pytorch-lightning_version, and the ModelCheckpoint callback's monitor and
    best score when the file has them."""


def sha256_of(path: Path) -> str:
    from data_sharding.storage import sha256_file

    return sha256_file(path)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _refuse(p: Path, names: list[str]) -> DataError:
    shown = ", ".join(sorted(names)[:5]) + (" ..." if len(names) > 5 else "")
    return DataError(
        f"{p}: refused to load: its pickle names {shown}, which is neither a tensor, a plain container nor one of "
        f"the Lightning callback classes an authors' checkpoint holds ({', '.join(LIGHTNING_CLASSES)}); "
        "nothing from the file was run")


def _unreadable(p: Path, size: int, is_zip: bool, exc: BaseException) -> DataError:
    if is_zip:
        return DataError(f"{p}: truncated or damaged ({size} bytes; the torch zip archive cannot be read: "
                         f"{_one_line(exc)}); download it again")
    return DataError(f"{p}: not a torch checkpoint ({size} bytes; {_one_line(exc)}); expected the authors' "
                     "Lightning .ckpt file (torch.save of a dict with 'state_dict')")


_LEGACY_PICKLES = 5  # torch's legacy format: magic number, protocol, sys info, the object, storage keys


def _legacy_globals(p: Path) -> set[str]:
    """The globals named by the pickles at the start of a non-zip file (torch's legacy format is a few
    pickles followed by raw storage bytes; any other pickle file is one pickle), read statically with
    :mod:`pickletools` (nothing is executed); stops at the first thing that is not a pickle."""
    import pickletools

    names: set[str] = set()
    with open(p, "rb") as f:
        for _ in range(_LEGACY_PICKLES):
            strings: list[str] = []
            try:
                for op, arg, _pos in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        names.add(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.add(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # noqa: BLE001 - raw storage bytes or garbage: no more pickles to read
                break
    return names


def _foreign(names: set[str]) -> list[str]:
    """Globals a legacy torch checkpoint of the authors' would not name (torch's own rebuild functions and
    storage types, OrderedDict and the Lightning stubs are left to the weights-only unpickler to judge)."""
    return sorted(n for n in names if not n.startswith("torch.") and n not in ("collections.OrderedDict", *STUBS))


def _torch_load(p: Path, size: int, is_zip: bool) -> Any:
    allowed = [(stub, name) for name, stub in STUBS.items()]
    with torch.serialization.safe_globals(allowed):
        if is_zip:
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(p))
            except ValueError as exc:  # a zip that torch.save did not write (a TorchScript archive, ...)
                raise _unreadable(p, size, False, exc) from None
            except Exception as exc:  # noqa: BLE001 - any zip/record error means the archive is damaged
                raise _unreadable(p, size, True, exc) from None
        else:
            unsafe = _foreign(_legacy_globals(p))
        if unsafe:
            raise _refuse(p, unsafe)
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            m = _UNSUPPORTED.search(str(exc))
            if m:
                raise _refuse(p, [m.group(1)]) from None
            raise _unreadable(p, size, is_zip, exc) from None
        except Exception as exc:  # noqa: BLE001 - EOFError, RuntimeError (zip reader), ValueError: the file's fault
            raise _unreadable(p, size, is_zip, exc) from None


def _callback_info(callbacks: Any) -> dict[str, Any]:
    info: dict[str, Any] = {}
    if not isinstance(callbacks, Mapping):
        return info
    for key, state in callbacks.items():
        if getattr(key, "full_name", "") == LIGHTNING_CLASSES[0] and isinstance(state, Mapping):
            if isinstance(state.get("monitor"), str):
                info["monitor"] = state["monitor"]
            best = state.get("best_model_score")
            if isinstance(best, torch.Tensor) and best.numel() == 1:
                info["best_model_score"] = float(best)
            elif isinstance(best, (int, float)) and not isinstance(best, bool):
                info["best_model_score"] = float(best)
    return info


def read_authors_file(path: str | Path) -> AuthorsFile:
    """The state dict (and counters) of an authors' checkpoint; a one-line DataError when it cannot be."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file (expected an authors' checkpoint, e.g. mortality/seed_23.ckpt)")
    size = p.stat().st_size
    with open(p, "rb") as f:
        is_zip = f.read(4) == _ZIP_MAGIC
    obj = _torch_load(p, size, is_zip)
    info: dict[str, Any] = {}
    if isinstance(obj, Mapping) and "state_dict" in obj:
        state = obj["state_dict"]
        kind = "full" if ("callbacks" in obj or "optimizer_states" in obj) else "weights-only"
        for key in ("epoch", "global_step", "pytorch-lightning_version"):
            value = obj.get(key)
            if isinstance(value, (int, str)) and not isinstance(value, bool):
                info[key] = value
        info.update(_callback_info(obj.get("callbacks")))
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, kind = obj, "state dict"
    else:
        what = f"a dict with keys {', '.join(sorted(map(str, obj))[:6])}" if isinstance(obj, Mapping) else type(obj).__name__
        raise DataError(f"{p}: not an authors' checkpoint: the torch file holds {what} and no 'state_dict'")
    if not isinstance(state, Mapping) or not state:
        raise DataError(f"{p}: 'state_dict' is {type(state).__name__}, expected a non-empty mapping of names to tensors")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise DataError(f"{p}: 'state_dict' entry {bad[0]!r} is not a named tensor")
    return AuthorsFile(path=p, state_dict=dict(state), kind=kind, sha256=sha256_of(p), size=size, info=info)
