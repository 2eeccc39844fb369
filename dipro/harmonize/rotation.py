"""A post-hoc orthogonal rotation of the region features whose first k coordinates carry the acquisition.

After Pan et al. (MICCAI AMAI 2025, arXiv:2509.11436, "Disentanglement of Biological and Technical
Factors via Latent Space Rotation"): the technical shift is learned from *paired* latents, by a
linear classifier of their differences, and an SVD of the classifier turns it into a rotation
``z' = R (z - mu)`` whose first k coordinates are technical and whose other d - k coordinates are
biological.  Their code is not public; this follows their published description:

* **contrasts** ``c = z_a - z_b``: the same stay, the same region, films a and b taken in two
  settings close in time, so anatomy and (most of) the pathology cancel and what is left is the
  setting, plus noise (:mod:`dipro.harmonize.pairs`; without such pairs, stay-centred contrasts
  ``c = z - mean of the stay``);
* **classifier**: an L2 logistic regression without intercept that tells ``+c`` (a's setting) from
  ``-c`` (b's setting), one per pair of settings (one-vs-rest on stay-centred contrasts), read as
  its activation pattern ``Cov(c) w`` (Haufe et al. 2014: where the setting lives, not the filter);
* **SVD**: the top right singular vector of the stacked classifier patterns is the next technical
  direction; it is projected out of the contrasts and the fit repeats, k times (iterative nullspace
  projection: a linear classifier that still finds the setting after one direction finds the next);
* **rotation**: the k directions, completed to an orthonormal basis of R^d (QR), are the rows of R.

``remove(z) = z - V_k^T V_k (z - mu)`` (``V_k`` = the first k rows of R) keeps the biological
coordinates and sets the technical ones to the mean: what :class:`AcquisitionRemoval` does to
``F`` inside the model (``DiPro.feature_edit``) at evaluation and in ``dipro predict``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_sharding.errors import UserError

ROTATION_FILE = "rotation.pt"
META_FILE = "rotation.json"
PROBE_C = 1.0
"""Inverse L2 strength of the contrast classifier (scikit-learn ``C``)."""


@dataclass
class Rotation:
    """An orthogonal ``rotation`` [d, d] (rows: new coordinates, the first ``k`` technical) about ``mean`` [d]."""

    rotation: np.ndarray
    mean: np.ndarray
    k: int
    meta: dict = field(default_factory=dict)
    """factor, classes, pairing, pair count, model, split: saved in rotation.json."""

    @property
    def d(self) -> int:
        return int(self.rotation.shape[0])

    @property
    def technical(self) -> np.ndarray:
        """V_k [k, d]: the technical directions (orthonormal rows)."""
        return self.rotation[: self.k]

    def rotate(self, x: np.ndarray) -> np.ndarray:
        """[N, d] -> [N, d] rotated coordinates (the first k technical)."""
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.rotation.T

    def biological(self, x: np.ndarray) -> np.ndarray:
        """[N, d] -> [N, d - k]: the rotated biological coordinates."""
        return self.rotate(x)[:, self.k:]

    def remove(self, x: np.ndarray) -> np.ndarray:
        """[N, d] -> [N, d] in the original coordinates with the technical ones set to the mean."""
        x = np.asarray(x, dtype=np.float64)
        v = self.technical
        return x - ((x - self.mean) @ v.T) @ v


def _contrast_patterns(contrasts: np.ndarray, labels: np.ndarray, symmetric: bool, seed: int) -> np.ndarray:
    """Activation patterns [m, d] of the linear classifier(s) of the setting from the contrasts.

    A classifier's weight vector w is a filter; where the setting lives in the features is its
    pattern ``Cov(x) w`` (Haufe et al., NeuroImage 2014): with correlated features the two differ,
    and removing w would leave the setting's mean shift in place while removing the pattern does not."""
    from sklearn.linear_model import LogisticRegression

    rows = []
    if symmetric:  # paired differences, labelled by their (setting of a, setting of b): tell +c from -c
        for pair in np.unique(labels):
            c = contrasts[labels == pair]
            x = np.concatenate([c, -c])
            y = np.concatenate([np.ones(len(c)), np.zeros(len(c))])
            clf = LogisticRegression(C=PROBE_C, fit_intercept=False, max_iter=2000, random_state=seed).fit(x, y)
            rows.append((x.T @ x / len(x)) @ clf.coef_[0])
    else:  # stay-centred contrasts: one-vs-rest per setting
        classes = np.unique(labels)
        cov = np.cov(contrasts, rowvar=False)
        for cls in (classes[1:] if len(classes) == 2 else classes):
            y = (labels == cls).astype(int)
            clf = LogisticRegression(C=PROBE_C, max_iter=2000, random_state=seed).fit(contrasts, y)
            rows.append(cov @ clf.coef_[0])
    return np.asarray(rows, dtype=np.float64)


def fit_rotation(contrasts: np.ndarray, labels: np.ndarray, k: int, *, mean: np.ndarray,
                 symmetric: bool = True, seed: int = 0, meta: dict | None = None) -> Rotation:
    """Fit the rotation from ``contrasts`` [N, d] with their ``labels`` [N] (see module doc).

    ``symmetric``: the contrasts are paired differences labelled by their (setting a, setting b)
    pair; otherwise stay-centred contrasts labelled by their setting.  ``mean`` [d]: the centre
    of the features the rotation will be applied to."""
    c = np.asarray(contrasts, dtype=np.float64)
    labels = np.asarray(labels)
    n, d = c.shape
    if not 1 <= k < d:
        raise UserError(f"--k must be in [1, {d - 1}] for {d}-dimensional features, got {k}")
    if len(np.unique(labels)) < (1 if symmetric else 2):
        raise UserError("the contrasts hold a single setting: nothing to separate")
    scale = c.std(axis=0).mean() or 1.0
    c = c / scale  # the classifier's regularisation sees unit-sized contrasts
    basis: list[np.ndarray] = []
    for _ in range(k):
        w = _contrast_patterns(c, labels, symmetric, seed)
        if basis:  # numerical hygiene: stay in the complement of the directions found so far
            b = np.asarray(basis)
            w = w - (w @ b.T) @ b
        _, s, vt = np.linalg.svd(w, full_matrices=False)
        u = vt[0] if s[0] > 0 else np.eye(d)[len(basis)]
        u = u / np.linalg.norm(u)
        if w[0] @ u < 0:  # orient along the first contrast's pattern (towards setting a / the class)
            u = -u
        basis.append(u)
        c = c - np.outer(c @ u, u)  # project the direction out of the contrasts; fit again
    v = np.asarray(basis)  # [k, d], orthonormal up to rounding
    q, _ = np.linalg.qr(np.concatenate([v.T, np.eye(d)], axis=1))  # first k columns span v
    q = q[:, :d]
    signs = np.sign(np.sum(q[:, :k] * v.T, axis=0))
    q[:, :k] *= np.where(signs == 0, 1.0, signs)
    rotation = q.T
    return Rotation(rotation=rotation, mean=np.asarray(mean, dtype=np.float64), k=k,
                    meta={**(meta or {}), "contrasts": int(n), "k": k, "d": d})


# ----------------------------------------------------------------------------- files

def save_rotation(out_dir: str | Path, rot: Rotation) -> tuple[Path, Path]:
    """``rotation.pt`` (tensors: rotation, mean, k; ``torch.load(weights_only=True)``) and ``rotation.json``."""
    import io

    import torch

    from data_sharding.atomic import write_bytes, write_text

    out = Path(out_dir)
    buf = io.BytesIO()
    torch.save({"rotation": torch.from_numpy(rot.rotation.copy()), "mean": torch.from_numpy(rot.mean.copy()),
                "k": torch.tensor(rot.k)}, buf)
    pt, js = out / ROTATION_FILE, out / META_FILE
    write_bytes(pt, buf.getvalue())
    write_text(js, json.dumps({**rot.meta, "k": rot.k, "d": rot.d}, indent=1, default=_json_default) + "\n")
    return pt, js


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def load_rotation(path: str | Path) -> Rotation:
    """A rotation saved by :func:`save_rotation` (``path`` = its directory or its rotation.pt)."""
    import torch

    p = Path(path)
    d = p.parent if p.name == ROTATION_FILE else p
    pt, js = d / ROTATION_FILE, d / META_FILE
    for f in (pt, js):
        if not f.is_file():
            raise UserError(f"--remove-acquisition {path}: {f} does not exist (a directory written by dipro harmonize "
                            f"holds {ROTATION_FILE} and {META_FILE})")
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
        meta = json.loads(js.read_text())
        rot = Rotation(rotation=state["rotation"].double().numpy(), mean=state["mean"].double().numpy(),
                       k=int(state["k"]), meta=meta)
    except Exception as exc:  # noqa: BLE001 - any damage is one user-facing line
        raise UserError(f"--remove-acquisition {path}: cannot read {pt.name}/{js.name} ({type(exc).__name__}: {exc})") from None
    if rot.rotation.ndim != 2 or rot.rotation.shape[0] != rot.rotation.shape[1] or rot.mean.shape != (rot.d,) \
            or not 1 <= rot.k < rot.d:
        raise UserError(f"--remove-acquisition {path}: {pt.name} holds a rotation of shape {tuple(rot.rotation.shape)}, "
                        f"mean {tuple(rot.mean.shape)} and k={rot.k}: expected [d, d], [d] and 1 <= k < d")
    return rot


class AcquisitionRemoval:
    """``DiPro.feature_edit``: project the technical coordinates out of ``F`` [B,T,R,d] (real crops only).

    A plain callable, not an ``nn.Module``: setting it on a model adds nothing to its state dict."""

    def __init__(self, rot: Rotation, device="cpu") -> None:
        import torch

        self.rot = rot
        self.v = torch.as_tensor(rot.technical, dtype=torch.float32, device=device)
        self.mean = torch.as_tensor(rot.mean, dtype=torch.float32, device=device)

    def __call__(self, features, mask):
        import torch

        v = self.v.to(features.device, features.dtype)
        mean = self.mean.to(features.device, features.dtype)
        removed = features - ((features - mean) @ v.T) @ v
        return torch.where(mask[..., None], removed, features)

    def check_model(self, model, source: str) -> None:
        d = model.cfg.d_model
        if self.rot.d != d:
            raise UserError(f"--remove-acquisition {source}: the rotation is {self.rot.d}-dimensional but the model's "
                            f"region features have model.d_model={d}; fit it on this model with dipro harmonize")


def attach_removal(model, path: str | Path | None) -> Rotation | None:
    """Load the rotation at ``path`` (None: nothing) and set it as ``model.feature_edit``."""
    if path is None:
        return None
    rot = load_rotation(path)
    device = next(model.parameters()).device
    edit = AcquisitionRemoval(rot, device)
    edit.check_model(model, str(path))
    model.feature_edit = edit
    return rot


__all__ = ["Rotation", "fit_rotation", "save_rotation", "load_rotation", "AcquisitionRemoval", "attach_removal",
           "ROTATION_FILE", "META_FILE"]
