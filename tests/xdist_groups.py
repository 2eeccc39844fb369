"""How ``make test`` spreads the non-cluster tests over pytest-xdist workers (``--dist loadgroup``).

Each test file is one unit, run on one worker (its module fixtures are built once), except the files in
:data:`RAY_HEAVY`: they start a local Ray cluster for training or a Ray Tune sweep, several times each,
with bounds on how long scheduling may take (trainer.schedule_timeout_s, the sweep's hold waits, the
fault tests' recovery bounds). Two of them at once on a 2-core machine starve each other's raylets past
those bounds, so they form one unit: one worker runs them one after the other, first (they are the
longest), while the other workers take the remaining files.

xdist's own loadgroup reads ``xdist_group`` markers and appends the group to each node id by setting
``item._nodeid``, which pytest 9.2 no longer reads (node ids live in ``Node._id``): every test became a
unit of its own and files were split across workers. So the unit is computed here, on the controller,
from the node id (``tests/conftest.py: pytest_xdist_make_scheduler``).
"""
from __future__ import annotations

from pathlib import Path

RAY_HEAVY = ("test_train_ray", "test_faults_train", "test_sweep", "test_tracking_train", "test_demo")
RAY_GROUP = "ray-training"


def xdist_group_of(nodeid: str) -> str:
    """The scheduling unit of a test: :data:`RAY_GROUP`, or its file."""
    path = nodeid.split("::", 1)[0]
    return RAY_GROUP if Path(path).stem in RAY_HEAVY else path


def make_scheduler(config, log):
    """A LoadScopeScheduling over :func:`xdist_group_of` for ``--dist loadgroup`` (else None: xdist decides).

    Units are queued in collection order (``--no-loadscope-reorder``), which conftest sorts group first."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileOrRayGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(nodeid)

    return FileOrRayGroupScheduling(config, log)
