"""Node loss on a real multi-node Ray cluster on one machine, through ``ray job submit``.

The cluster: a token-authenticated head with no CPUs for workers (as on a real cluster,
the head runs the job's driver and the Train controller, not the ranks) and two worker
nodes with 2 logical CPUs each, every node its own ``ray start`` with its own ports and
temp dir (tests/ray_head.py).  One cluster serves the module; a test that loses nodes
leaves the next test to start fresh ones (:meth:`RayHead.ensure_nodes`).

Every job is ``dipro train`` with the demo config on a 40-patient cohort (23 training
samples; micro batch 2) and holds once at optimizer step 3 (test-only fault injection,
dipro/train/faults.py), after the step-2 checkpoint was written, so the test can kill a
node's raylet by pid while training is in flight:

* an elastic group (``trainer.num_workers=1-2``), one node killed: it continues with 1 worker;
* two fixed workers spread over both worker nodes, one node killed: the group restarts
  on the node that is left from the step-2 checkpoint and finishes as one MLflow run;
* both worker nodes killed: the run fails within ``trainer.schedule_timeout_s`` (plus a
  generous margin) with one line naming what it asked for and what the cluster has.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest
import yaml

from ray_head import RayHead

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CPUS_PER_NODE = 2
HOLD_AT_STEP = 3


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """40 synthetic patients at 64 px, sharded with the demo config's 32-px crops."""
    from data_sharding.manifest import ShardSettings
    from data_sharding.prepare import PrepareOptions, prepare
    from data_sharding.readers import resolve_roots
    from data_sharding.shard_writer import write_shards
    from data_sharding.synth import generate
    from dipro.config import load_config

    root = tmp_path_factory.mktemp("multinode-cohort")
    generate(root / "raw", patients=40, seed=5, image_size=64, progress=False)
    prepare(resolve_roots(str(root / "raw"), None, None, None), root / "processed", PrepareOptions(progress=False))
    crop = load_config(REPO / "configs" / "demo.yaml").model.crop_size
    write_shards(root / "processed", root / "shards", settings=ShardSettings(crop_size=crop), workers=1,
                 progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def cluster():
    head = RayHead(num_cpus=0)
    head.start()
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture
def nodes(cluster):
    """Two live worker nodes (fresh ones where a previous test killed some)."""
    return cluster.ensure_nodes(2, CPUS_PER_NODE)


@pytest.fixture
def submit(cluster, cohort, tmp_path):
    """``submit(*overrides)`` starts a :class:`Job`; a job still running when the test ends is stopped."""
    jobs: list[Job] = []

    def _submit(*overrides: str, expect_ranks: int = 2) -> Job:
        job = Job(cluster, cohort, tmp_path, *overrides)
        jobs.append(job)
        job.wait_started(expect_ranks)
        return job

    yield _submit
    for job in jobs:
        if cluster.job_info(job.id)["status"] in ("PENDING", "RUNNING"):
            cluster.stop_job(job.id)
            cluster.wait_for_job(job.id, timeout_s=120)


def train_samples(shards: Path) -> int:
    from dipro.data.plan import read_manifest

    return read_manifest(shards, "mortality", "train").num_samples


class Job:
    """One ``dipro train`` job on the cluster, held at :data:`HOLD_AT_STEP` until the test acts."""

    def __init__(self, cluster: RayHead, shards: Path, tmp: Path, *overrides: str) -> None:
        self.cluster, self.tmp = cluster, tmp
        self.run_name = f"mn-{uuid.uuid4().hex[:6]}"
        self.storage = tmp / "runs"
        self.uri = f"sqlite:///{tmp / 'mlflow.db'}"
        self.hold = tmp / "held"
        self.id = f"dipro-test-mn-{uuid.uuid4().hex[:8]}"
        env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
        env.setdefault("env_vars", {}).update(
            MLFLOW_TRACKING_URI=self.uri,
            DIPRO_FAULT_INJECT=json.dumps({"hold_at_step": HOLD_AT_STEP, "hold_file": str(self.hold), "hold_s": 240}))
        entry = ["python", "-m", "dipro", "train", "--config", "configs/demo.yaml", f"data.shards={shards}",
                 f"trainer.storage_path={self.storage}", f"trainer.run_name={self.run_name}",
                 "data.batch_size=2", "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=2",
                 "trainer.num_to_keep=20", "trainer.log_every_n_steps=1", "trainer.placement_strategy=SPREAD",
                 "tracking.register=false", *overrides]
        proc = cluster.submit(self.id, entry, env, cwd=REPO, wait=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def wait_started(self, ranks: int, timeout_s: float = 300.0) -> None:
        """Until ``ranks`` ranks hold at step 3 and their start lines have reached the job's log."""
        deadline = time.monotonic() + timeout_s
        while True:
            held = all(Path(f"{self.hold}.rank{r}").exists() for r in range(ranks))
            groups = self.rank_nodes() if held else []
            if groups and len(groups[-1]) >= ranks:
                return
            status = self.cluster.job_info(self.id)["status"]
            assert status in ("PENDING", "RUNNING"), f"job {status} before step {HOLD_AT_STEP}:\n{self.logs()[-4000:]}"
            assert time.monotonic() < deadline, f"no hold at step {HOLD_AT_STEP}:\n{self.logs()[-4000:]}"
            time.sleep(1.0)

    def logs(self) -> str:
        return self.cluster.logs(self.id)

    def rank_nodes(self) -> list[dict[int, str]]:
        """Per worker-group start, in order: {world rank: Ray node id}, from the ranks' start lines
        (a rank number seen again begins the next group)."""
        groups: list[dict[int, str]] = []
        seen: set[str] = set()
        for line in self.logs().splitlines():
            m = re.search(r"world rank (\d+) of \d+ on Ray node ([0-9a-f]+) \(\S+, pid (\d+)\)", line)
            if not m or m.group(3) in seen:  # Ray repeats some worker lines: one per process
                continue
            seen.add(m.group(3))
            rank = int(m.group(1))
            if not groups or rank in groups[-1]:
                groups.append({})
            groups[-1][rank] = m.group(2)
        return groups

    def mlflow_run(self):
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        runs = client.search_runs([client.get_experiment_by_name("dipro").experiment_id])
        assert [r.info.run_name for r in runs] == [self.run_name]  # one MLflow run, whatever happened
        return client, runs[0]

    def lose_node_of_rank(self, nodes, rank: int):
        """Kill the raylet of the node holding ``rank`` in the held group, wait for the job to succeed;
        (the node left, the job's logs)."""
        first = self.rank_nodes()[-1]
        victim = next(n for n in nodes if n.node_id == first[rank])
        survivor = next(n for n in nodes if n is not victim)
        victim.kill_raylet()
        info = self.cluster.wait_for_job(self.id, timeout_s=600)
        logs = self.logs()
        assert info["status"] == "SUCCEEDED", logs[-6000:]
        return survivor, logs


def history(client, run_id: str, key: str) -> list:
    """Metric values in the order they were logged."""
    return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))


def test_elastic_group_continues_with_fewer_workers(nodes, cohort, submit):
    """``trainer.num_workers=1-2`` with a node's worth of CPUs per worker: 2 workers while both
    nodes live, 1 after one node is lost, resumed from the step-2 checkpoint with the data position
    rescaled to the new world size.

    First in the module, on the two worker nodes the cluster started with.  An elastic group is sized
    by Ray Train's AutoscalingCoordinator, a detached actor that re-reads ``ray.nodes()`` every 20 s
    and is consulted about growing a running group every 60 s: on a node re-added after the node-loss
    test the group started with 1 worker in 2 of 3 CI runs (2026-12-03) and, held at step 3, had not
    grown to 2 within the 300 s wait.  A fixed-size group (the tests below) is placed by the GCS,
    whose view ``ensure_nodes`` waits for."""
    samples = train_samples(cohort)
    two, one = samples // (2 * 2), samples // (2 * 1)  # steps per epoch with 2 and with 1 worker
    assert (two, one) == (5, 11)
    job = submit("trainer.num_workers=1-2", f"trainer.cpus_per_worker={CPUS_PER_NODE}", "trainer.max_failures=1",
                 # each group start may take schedule_timeout_s / 4 = 20 s: after the kill, Ray Train first
                 # tries 2 workers again (the dead node's CPUs still count until the GCS marks it dead)
                 "trainer.schedule_timeout_s=80")
    # The group holding at step 2 is the last one started (a group whose start failed on a node that
    # was just re-added is restarted by Ray Train before any step: its ranks' lines come first).
    first = job.rank_nodes()[-1]
    assert sorted(first) == [0, 1] and first[0] != first[1], first
    survivor, logs = job.lose_node_of_rank(nodes, 1)
    assert job.rank_nodes()[-1] == {0: survivor.node_id}
    # The step-2 checkpoint is normally the 2-worker group's: 2 micro batches per rank = 4 for a single
    # rank.  When the group first started with 1 worker (the re-added node's CPUs not yet in the view Ray
    # Train places by; seen once in CI, 2026-12-03) that group wrote it, Ray Train grew it to 2 workers,
    # and the 1-worker group after the kill resumes from 2 micro batches: the rescaling is the same rule.
    meta = json.loads((job.storage / job.run_name / "checkpoint_s00000002" / "meta.json").read_text())
    done = meta["batches_in_epoch"] * meta["world_size"]
    final_step = 2 + (one - done) + one
    assert f"epoch 0, step 2, {done} micro batches of that epoch done" in logs
    client, run = job.mlflow_run()
    assert run.info.status == "FINISHED"
    sizes = [(m.step, int(m.value)) for m in history(client, run.info.run_id, "train/world_size")]
    after_kill = [(s, 1) for s in range(3, final_step + 1)]
    assert sizes[-len(after_kill):] == after_kill and (HOLD_AT_STEP, 2) in sizes, sizes
    if meta["world_size"] == 2:
        assert sizes == [(s, 2) for s in range(1, HOLD_AT_STEP + 1)] + after_kill, sizes
    assert json.loads((job.storage / job.run_name / "summary.json").read_text())["global_step"] == final_step


def test_node_loss_resumes_from_last_checkpoint_on_what_is_left(cluster, nodes, cohort, submit):
    """Two DDP workers on two nodes (SPREAD); the node of rank 0 loses its raylet after the step-2
    checkpoint; the group restarts from that checkpoint on the other node and finishes."""
    steps_per_epoch = train_samples(cohort) // (2 * 2)  # floor(N / (micro batch x workers))
    assert steps_per_epoch == 5
    final_step = 2 * steps_per_epoch
    job = submit("trainer.num_workers=2", "trainer.max_failures=1")
    first = job.rank_nodes()[-1]  # the group holding at step 2 (see the elastic test)
    worker_ids = {n.node_id for n in nodes}
    assert sorted(first) == [0, 1] and first[0] != first[1], first  # SPREAD: one rank per node
    assert set(first.values()) == worker_ids and cluster.node_id not in first.values()
    survivor, logs = job.lose_node_of_rank(nodes, 0)
    groups = job.rank_nodes()
    assert len(groups) == 2 and groups[1] == {0: survivor.node_id, 1: survivor.node_id}, groups
    run_dir = job.storage / job.run_name
    assert f"resumed (restarted worker group) from {run_dir / 'checkpoint_s00000002'}: epoch 0, step 2" in logs

    # Checkpoints: every 2 steps and at each epoch end, before and after the restart, all under storage_path.
    assert sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()) == [
        "checkpoint_s00000002", "checkpoint_s00000004", "checkpoint_s00000005_epoch0000",
        "checkpoint_s00000006", "checkpoint_s00000008", "checkpoint_s00000010_epoch0001"]
    # The step-2 checkpoint was written by ranks on two non-head nodes (rank 1 only writes its RNG
    # state; rank 0 the model): both files arrived under trainer.storage_path.
    for name in ("model.pt", "meta.json", "train_state.pt", "rng/rank_0.pt", "rng/rank_1.pt"):
        assert (run_dir / "checkpoint_s00000002" / name).is_file(), name
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == final_step

    # One MLflow run with a continuous step axis: in the order they were logged, the optimizer
    # steps (train/lr is logged once per step) run 1..3 (the first group logged step 3, then held),
    # go back exactly to the resumed checkpoint (step 2), and run 3..10 without a gap.  Nothing
    # before the checkpoint repeats, nothing is skipped, nothing goes past the end.
    client, run = job.mlflow_run()
    assert run.info.status == "FINISHED"
    steps = [m.step for m in history(client, run.info.run_id, "train/lr")]
    assert steps == list(range(1, HOLD_AT_STEP + 1)) + list(range(2 + 1, final_step + 1)), steps
    assert [m.step for m in history(client, run.info.run_id, "val/loss")] == [steps_per_epoch, final_step]
    assert {m.value for m in history(client, run.info.run_id, "train/world_size")} == {2}


def test_workers_that_cannot_be_placed_fail_within_the_bound(cluster, nodes, submit):
    """Issue 16: both worker nodes lost, nothing left to place 2 workers on; max_failures allows a
    restart, but the wait for resources ends after trainer.schedule_timeout_s: the job FAILS with
    one line (exit 2) and the MLflow run is FAILED with that reason."""
    timeout_s = 20
    job = submit("trainer.num_workers=2", "trainer.max_failures=3", f"trainer.schedule_timeout_s={timeout_s}")
    for n in nodes:
        n.kill_raylet()
    killed = time.monotonic()
    margin_s = 150  # node-loss detection, placement tries, shutdown, the driver's exit: generous
    info = cluster.wait_for_job(job.id, timeout_s=timeout_s + margin_s)  # raises if still running
    assert info["status"] == "FAILED"
    assert time.monotonic() - killed < timeout_s + margin_s
    assert "exit code 2" in info.get("message", ""), info.get("message")
    logs = job.logs()
    expected = (f"dipro train: error: run {job.run_name} stopped: the worker group could not be placed within "
                f"trainer.schedule_timeout_s={timeout_s}s: asked for 2 workers x {{CPU: 1}} (placement SPREAD); "
                "the cluster has now 1 alive node(s) with CPU 0 (0 free)")
    lines = [line for line in logs.splitlines() if line.startswith("dipro train: error:")]
    assert len(lines) == 1 and lines[0].startswith(expected), lines or logs[-4000:]
    client, run = job.mlflow_run()
    assert run.info.status == "FAILED"
    assert run.data.tags["failure.reason"] == lines[0].split("dipro train: error: ", 1)[1]
