"""benchmarks/gpu.py --smoke: the one-call GPU benchmark runs end to end on a CPU (tiny sizes), so the
script the GPU session runs is known to work before a GPU is at hand; the figures are not checked
(no timed assertions), only that every section measured what it names.

The ``train`` section (two ``dipro train`` runs on Ray, ~4 minutes on the 2-core CI machine) is
left out to keep the suite short: the compiled step under DDP and DeepSpeed in Ray workers is
tests/test_train_ray.py (DDP and ZeRO-2 runs), and the section's own bookkeeping is `train_run`'s reading of
the run's second-epoch checkpoint, which the GPU session reports per strategy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # makes its own shards and measures every setting

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_runs_its_sections(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--work", str(tmp_path / "w"),
                           "--json", str(out), "--sections", "shards,step,memory,loader"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    step = res["step"]
    assert set(step) == {"fp32 eager", "bf16 eager", "fp32 channels-last", "bf16 channels-last",
                         "bf16 channels-last compiled (default)", "backbone alone"}
    assert step["fp32 eager"]["speedup"] == 1.0 and all(v["ms"] > 0 for v in step.values())
    assert set(res["memory"]) == {"checkpointing=False", "checkpointing=True", "checkpointing=True,encoder_chunk=16"}
    assert set(res["loader"]) == {"0", "2"} and all(v["samples_per_s"] > 0 for v in res["loader"].values())
    assert {"default_step_vs_fp32_eager", "dipro_vs_backbone_alone"} <= set(res["ratios"])
    assert "train" not in res or not res["train"]
    for heading in ("[step]", "[memory]", "[loader]", "ratios:"):
        assert heading in proc.stdout
