"""The authors' released checkpoints (github.com/Chenliu-svg/DiPro, Hugging Face Chenhihihi/DiPro_model).

* :mod:`dipro.authors.safe_load`: read a PyTorch Lightning 1.4.2 ``.ckpt`` without running code from it.
* :mod:`dipro.authors.mapping`: the one documented mapping of the authors' state dict onto
  :class:`dipro.model.DiPro` (every key consumed or listed as unused), and what the tensor shapes say
  about task, width, layers, groups and crop size.
* :mod:`dipro.authors.importer`: ``dipro import-authors`` -- a checkpoint directory of this project
  (what a run's ``best/`` holds) from one file or from the release's ``<task>/seed_N.ckpt`` layout.
"""
