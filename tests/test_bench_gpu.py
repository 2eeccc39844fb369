"""benchmarks/gpu.py --smoke: the one-call GPU benchmark runs end to end on a CPU (tiny sizes), so the
script the GPU session runs is known to work before a GPU is at hand; the figures are not checked
(no timed assertions), only that every section measured what it names."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # dipro train on Ray, twice

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_runs_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--work", str(tmp_path / "w"),
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    step = res["step"]
    assert set(step) == {"fp32 eager", "bf16 eager", "fp32 channels-last", "bf16 channels-last",
                         "bf16 channels-last compiled (default)", "backbone alone"}
    assert step["fp32 eager"]["speedup"] == 1.0 and all(v["ms"] > 0 for v in step.values())
    assert set(res["memory"]) == {"checkpointing=False", "checkpointing=True"}
    for strategy in ("ddp", "deepspeed"):
        run = res["train"][strategy]
        assert run["samples_per_s"] > 0 and run["compile_s"] is not None  # the compiled path ran and was timed
    assert res["train"]["model_rate"] > 0
    assert set(res["loader"]) == {"0", "2"} and all(v["samples_per_s"] > 0 for v in res["loader"].values())
    assert {"default_step_vs_fp32_eager", "dipro_vs_backbone_alone", "train_ddp_vs_model",
            "train_deepspeed_vs_model"} <= set(res["ratios"])
    for heading in ("[step]", "[memory]", "[train]", "[loader]", "ratios:"):
        assert heading in proc.stdout
