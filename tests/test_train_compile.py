"""model.compile under Ray Train on CPU: DDP and DeepSpeed ZeRO-2 with 2 workers train the compiled
step (backend aot_eager: forward and backward traced as on a GPU, no kernels generated) to the
losses of the eager step.  A graph break, a host sync or a wrapper that bypasses the compiled
module would fail or diverge here."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
import processed_fixture  # noqa: E402

from dipro.config import load_config  # noqa: E402
from dipro.train import run_training  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return processed_fixture.make_training_shards(tmp_path_factory.mktemp("compile_shards"))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


def cfg_for(shards: Path, storage: Path, *overrides: str):
    return load_config(ROOT / "configs" / "demo.yaml", [
        "task=length_of_stay", f"data.shards={shards}", f"trainer.storage_path={storage}",
        "tracking.enabled=false", "data.num_loader_workers=0", "data.augment=false", "data.shuffle_buffer=0",
        "model.dropout=0.0", "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "trainer.precision=fp32",
        "trainer.num_workers=2", "data.batch_size=1", "optim.grad_accum=2", *overrides])


def test_compiled_step_trains_like_eager_under_ddp_and_deepspeed(shards, tmp_path, ray_local):
    compiled = ("model.compile=true", "model.compile_backend=aot_eager")
    eager = run_training(cfg_for(shards, tmp_path, "model.compile=false"))
    ddp = run_training(cfg_for(shards, tmp_path, *compiled))
    ds = run_training(cfg_for(shards, tmp_path, *compiled, "trainer.strategy=deepspeed", "trainer.zero_stage=2"))
    assert eager.global_step == ddp.global_step == ds.global_step == 3
    for run in (ddp, ds):
        for h_e, h_c in zip(eager.history, run.history, strict=True):
            assert h_c["train/total"] == pytest.approx(h_e["train/total"], rel=1e-3)
            assert h_c["val/loss"] == pytest.approx(h_e["val/loss"], rel=1e-3)
