"""The scheduling units of ``make test`` (tests/xdist_groups.py): files, and one group for the Ray-training files."""
from __future__ import annotations

from pathlib import Path

from xdist_groups import RAY_GROUP, RAY_HEAVY, xdist_group_of

TESTS = Path(__file__).resolve().parent


def test_every_ray_heavy_name_is_a_test_file():
    # a renamed file would silently leave the group and run beside the others again
    missing = [name for name in RAY_HEAVY if not (TESTS / f"{name}.py").is_file()]
    assert not missing, f"RAY_HEAVY names no file tests/<name>.py for {missing}"


def test_ray_files_share_one_unit_and_other_files_keep_their_own():
    assert xdist_group_of("tests/test_sweep.py::test_x[a-b]") == RAY_GROUP
    assert xdist_group_of("tests/test_demo.py::test_y") == RAY_GROUP
    assert xdist_group_of("tests/test_config.py::test_z") == "tests/test_config.py"
    assert xdist_group_of("tests/test_config.py::TestA::test_z") == "tests/test_config.py"
    assert xdist_group_of("tests/test_sweep_grid.py::test_w") == "tests/test_sweep_grid.py"
