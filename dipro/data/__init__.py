"""Streaming WebDataset shards into padded training/evaluation batches.

Public API (ARCHITECTURE.md section 3):

* :func:`build_loader` -- the loader of one task and split (:mod:`dipro.data.loader`);
* :func:`move_to_device` -- a batch's tensors to a device (:mod:`dipro.data.collate`);
* :func:`eval_index_for_rank` -- which global samples a rank evaluates (:mod:`dipro.data.plan`).
"""
from dipro.data.collate import collate, move_to_device
from dipro.data.decode import CorruptSample
from dipro.data.loader import LoaderStats, ShardLoader, build_loader
from dipro.data.plan import eval_index_for_rank

__all__ = [
    "build_loader", "move_to_device", "eval_index_for_rank", "collate",
    "CorruptSample", "LoaderStats", "ShardLoader",
]
