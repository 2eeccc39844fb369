"""`dipro demo`: every stage runs once, and a second run reuses what is still valid."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dipro.commands import demo

REPO = Path(__file__).resolve().parents[1]


def test_tree_fingerprint_follows_content_and_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.csv").write_text("1,2\n")
    first = demo.tree_fingerprint(tmp_path)
    assert demo.tree_fingerprint(tmp_path) == first
    (tmp_path / "a" / "x.csv").write_text("1,2,3\n")
    assert demo.tree_fingerprint(tmp_path) != first
    second = demo.tree_fingerprint(tmp_path)
    (tmp_path / "a" / "x.csv").rename(tmp_path / "a" / "y.csv")
    assert demo.tree_fingerprint(tmp_path) != second


def test_config_fingerprint_ignores_paths_and_run_names_only():
    from dipro.config import load_config

    base = load_config(demo.DEMO_CONFIG)
    same = load_config(demo.DEMO_CONFIG, ["data.shards=/elsewhere", "trainer.storage_path=/x",
                                          "trainer.run_name=r1", "tracking.uri=sqlite:///y.db"])
    other = load_config(demo.DEMO_CONFIG, ["optim.base_lr=0.5"])
    assert demo.config_fingerprint(base) == demo.config_fingerprint(same)
    assert demo.config_fingerprint(base) != demo.config_fingerprint(other)


def test_bf16_detection_reads_the_cpu_flags():
    x86_avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f\n"
    x86_bf16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n"
    arm_bf16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    assert not demo.cpu_has_native_bf16(x86_avx2)
    assert demo.cpu_has_native_bf16(x86_bf16)
    assert demo.cpu_has_native_bf16(arm_bf16)


def test_state_file_is_written_atomically(tmp_path):
    state = demo.State(tmp_path / demo.STATE_FILE)
    state.set("prepare.raw_fingerprint", "abc")
    assert json.loads((tmp_path / demo.STATE_FILE).read_text()) == {"prepare.raw_fingerprint": "abc"}
    assert not list(tmp_path.glob("*.tmp"))
    assert demo.State(tmp_path / demo.STATE_FILE).get("prepare.raw_fingerprint") == "abc"


# Both demo runs share one budget that ends before the test's pytest timeout, so a slow run fails
# here with the demo's output instead of being killed by pytest-timeout.
DEMO_BUDGET_S = 840


def _run_demo(out: Path, deadline: float, *extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(REPO)
    # its own session, so a run past the budget is stopped with the Ray processes it started
    proc = subprocess.Popen([sys.executable, "-m", "dipro", "demo", "--out", str(out), "--patients", "40", *extra],
                            cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process outside the group still holds the pipes
            stdout, stderr = "", ""
        pytest.fail(f"dipro demo did not finish within the test's {DEMO_BUDGET_S}s budget:\n"
                    f"{stdout[-3000:]}{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


@pytest.mark.slow
@pytest.mark.timeout(DEMO_BUDGET_S + 60)
def test_demo_runs_every_stage_then_reuses_them(tmp_path):
    deadline = time.monotonic() + DEMO_BUDGET_S
    out = tmp_path / "demo_output"
    first = _run_demo(out, deadline)
    for i, stage in enumerate(demo.STAGES, 1):
        assert f"[{i}/{len(demo.STAGES)}] {stage}:" in first
    assert "reused" not in first
    assert "dipro-mortality @champion -> version 1" in first
    assert f"mlflow ui --backend-store-uri sqlite:///{out.resolve()}/mlflow.db --host 127.0.0.1" in first
    assert (out / "predictions" / "mortality-test.parquet").is_file()
    table = first[first.index("Method"):].splitlines()
    assert re.match(r"DiPro demo v1\s+\S+\s+\S+", table[2]), table[:3]

    second = _run_demo(out, deadline)
    for stage in ("synth", "prepare", "shard", "train", "register", "predict"):
        block = second.split(f"] {stage}:", 1)[1].split("\n[", 1)[0]
        assert "reused" in block, (stage, block)
    assert "already holds @champion" in second
    assert "(reused)" in second
    metric_row = lambda text: text[text.index("DiPro demo v1"):].splitlines()[0]  # noqa: E731
    assert metric_row(second) == metric_row(first)  # re-evaluating the registered model gives the same numbers
