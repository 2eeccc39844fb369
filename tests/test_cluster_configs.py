"""Every file in cluster/ parses and says what the cluster needs.

YAML keys and resource names are checked against what Ray's cluster launcher
and KubeRay (ray.io/v1) expect; every ``dipro`` command a file or the README
names is parsed by the real CLI parser, every config file it names exists and
its ``key=value`` overrides resolve through :func:`dipro.config.load_config`.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

import ray
from data_sharding import storage
from dipro import cli
from dipro.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
IMAGE_PROJECT_DIR = "/home/ray/dipro"  # WORKDIR of cluster/Dockerfile
SHARED_MOUNT = "/mnt/dipro"
"""Where the NFS alternative (kuberay/storage.yaml, the launcher's commented mount) is mounted."""
SERVICE_ACCOUNT = "dipro"
K8S_RESOURCE_NAMES = {"cpu", "memory", "nvidia.com/gpu", "ephemeral-storage"}
PAPER_EFFECTIVE_BATCH = load_config(REPO / "configs" / "mortality.yaml").effective_batch_size


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kuberay_docs() -> dict[str, dict]:
    return {p.name: load_all(p)[0] for p in sorted(KUBERAY.glob("*.yaml"))}


def is_bucket(location: str) -> bool:
    """An ``s3://`` / ``gs://`` URI the storage layer accepts (no credentials or options in it)."""
    return storage.resolve(location).is_remote


# ----------------------------------------------------------------------------- commands

def dipro_argv(command: str) -> list[str]:
    """``python -m dipro X ...`` / ``dipro X ...`` / ``cluster/submit.sh KIND ...`` -> argv after ``dipro``."""
    tokens = shlex.split(command)
    if tokens[:3] == ["python", "-m", "dipro"]:
        return tokens[3:]
    if tokens[0] in ("dipro", ".venv/bin/dipro"):
        return tokens[1:]
    if tokens[0] == "cluster/submit.sh":
        kind, rest = tokens[1], tokens[2:]
        return ["shards", "regenerate", *rest] if kind == "regenerate" else [kind, *rest]
    raise AssertionError(f"not a dipro command: {command!r}")


def check_dipro_command(command: str) -> None:
    """The real parser accepts it; its --config exists; its overrides are valid config keys."""
    argv = dipro_argv(command)
    parser = cli.build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on unknown commands / flags
        raise AssertionError(f"`dipro {' '.join(argv)}` is rejected by dipro's parser") from exc
    if "--config" in argv:
        cfg_path = argv[argv.index("--config") + 1].replace(IMAGE_PROJECT_DIR + "/", "")
        assert (REPO / cfg_path).is_file(), f"{command!r}: config {cfg_path} does not exist"
        overrides = list(getattr(args, "overrides", None) or [])  # the key=value positionals, not flag values
        if getattr(args, "grid", None):  # dipro sweep: every grid key with each of its values
            from dipro.sweep.grid import expand, parse_grid

            for arm in expand(parse_grid(args.grid)):
                load_config(REPO / cfg_path, overrides + arm.overrides)
        load_config(REPO / cfg_path, overrides)  # raises ConfigError naming a bad key


def readme_commands() -> list[str]:
    """Every dipro / submit.sh command in cluster/README.md's shell blocks (continuations joined)."""
    text = (CLUSTER / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            line = re.sub(r'^([A-Z_]+=("[^"]*"|\S+)\s+)+', "", line)  # SUBMIT_FLAGS="..." cluster/submit.sh ...
            if line.startswith(("cluster/submit.sh", "dipro ")) and "--help" not in line:
                commands.append(line)
    return commands


def test_every_cluster_file_parses():
    for path in sorted(CLUSTER.rglob("*.yaml")):
        docs = load_all(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


@pytest.mark.parametrize("command", readme_commands())
def test_readme_commands_exist(command):
    check_dipro_command(command)


def test_readme_covers_the_whole_path():
    kinds = {dipro_argv(c)[0] for c in readme_commands()}
    assert {"prepare", "shard", "shards", "train", "evaluate", "registry", "predict"} <= kinds, kinds
    text = (CLUSTER / "README.md").read_text()
    for needle in ("--resume", "s3://", "gs://", "MUST be shared", "effective batch", "nvidia.com/gpu",
                   # object storage first: identity, layout, abandoned uploads, old generations, endpoints, MLflow
                   "IRSA", "workload identity", "AbortIncompleteMultipartUpload", "dipro shards gc",
                   "storage.s3_endpoint", "DIPRO_S3_ENDPOINT", "AWS_ENDPOINT_URL", "STORAGE_EMULATOR_HOST",
                   "--artifacts-destination", "--no-serve-artifacts", "NFS"):
        assert needle in text, needle
    assert text.index("IRSA") < text.index("NFS"), "object storage first, NFS second"
    # the commands of the walk-through keep their data and runs in a bucket
    paths = [t.split("=", 1)[1] for c in readme_commands() for t in shlex.split(c)
             if t.startswith(("data.shards=", "trainer.storage_path="))]
    assert paths and all(is_bucket(p) for p in paths), paths


def test_readme_sizing_table_keeps_the_paper_effective_batch():
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", (CLUSTER / "README.md").read_text(), re.M)
    assert len(rows) >= 4
    for gpus, micro, accum, effective in (tuple(map(int, r)) for r in rows):
        assert micro * gpus * accum == effective == PAPER_EFFECTIVE_BATCH, (gpus, micro, accum, effective)


# ----------------------------------------------------------------------------- runtime env

def test_runtime_env_uploads_code_only():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    excludes = {e.rstrip("/") for e in env["excludes"]}
    for heavy in (".venv", ".git", "data", "demo_output", "runs", "mlruns", "mlflow.db"):
        assert heavy in excludes, heavy
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "Ray env_vars must be strings"
    assert set(env) <= {"working_dir", "excludes", "env_vars", "py_modules", "pip", "uv", "conda", "config"}


def test_submit_script(tmp_path):
    script = CLUSTER / "submit.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run([str(script), "train", "--config", "configs/demo.yaml"],
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert proc.returncode == 2 and "RAY_ADDRESS" in proc.stderr
    kinds = re.findall(r"^  (\S+)\)\s+cmd=", script.read_text(), re.M)
    subcommands = set(next(a for a in cli.build_parser()._actions if a.dest == "command").choices)
    named = re.search(r"^  (synth\|.*?)\)", script.read_text(), re.M).group(1).split("|")
    assert set(named) <= subcommands, set(named) - subcommands
    assert {"regenerate", "dipro"} <= set(kinds)


# ----------------------------------------------------------------------------- cluster launcher

def test_cluster_launcher():
    cfg = yaml.safe_load((CLUSTER / "cluster-launcher.yaml").read_text())
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type",
                "file_mounts", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, key
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 2}
    assert gpu_types, "at least one multi-GPU worker type"
    for name, t in types.items():
        assert set(t["resources"]) <= {"CPU", "GPU", "memory"}, name
        assert "InstanceType" in t["node_config"], name
        if name != cfg["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
    for t in gpu_types.values():
        assert t["resources"]["CPU"] >= 4 * t["resources"]["GPU"]  # loader processes per GPU worker

    setup = cfg["setup_commands"]
    torch_i = next(i for i, c in enumerate(setup) if "torch==" in c)
    proj_i = next(i for i, c in enumerate(setup) if "install -q -e" in c)
    ds_i = next(i for i, c in enumerate(setup) if "deepspeed==" in c)
    assert torch_i < proj_i < ds_i and "--no-build-isolation" in setup[ds_i]
    # the bucket through the nodes' instance profiles, never keys
    for name, t in types.items():
        if name != cfg["head_node_type"]:
            assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    text = (CLUSTER / "cluster-launcher.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "s3://" in text
    for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in c:
            assert "RAY_AUTH_MODE=token" in c, c
    assert any("auth_token" in k for k in cfg["file_mounts"]), "token file shared with every node"
    assert ".venv" in cfg["rsync_exclude"]


# ----------------------------------------------------------------------------- KubeRay

def ray_containers(cluster_spec: dict):
    yield "head", cluster_spec["headGroupSpec"], cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["groupName"], group, group["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def assert_secret(env: dict, name: str) -> None:
    assert name in env, f"{name} missing"
    ref = env[name].get("valueFrom", {}).get("secretKeyRef")
    assert ref and ref.get("name") and ref.get("key"), f"{name} must come from a secretKeyRef"


def check_ray_cluster_spec(spec: dict, needs_mlflow: bool) -> int:
    """Checks one RayCluster spec; returns the number of GPUs its worker groups hold at full size."""
    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    total_gpus = 0
    for name, group, container in ray_containers(spec):
        env = env_of(container)
        assert env["RAY_AUTH_MODE"]["value"] == "token", name
        assert_secret(env, "RAY_AUTH_TOKEN")
        if needs_mlflow:
            assert_secret(env, "MLFLOW_TRACKING_URI")
        res = container["resources"]
        assert set(res["requests"]) | set(res["limits"]) <= K8S_RESOURCE_NAMES, name
        assert res["requests"] == res["limits"], f"{name}: requests must equal limits (Ray reads limits)"
        gpus = int(res["limits"].get("nvidia.com/gpu", 0))
        if name != "head":
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
            total_gpus += gpus * group["maxReplicas"]
        if gpus:
            assert name != "head"
            assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"].get("tolerations", []))
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == SERVICE_ACCOUNT, f"{name}: bucket access via the service account"
        assert not any(e["name"].startswith(("AWS_SECRET", "AWS_ACCESS", "GOOGLE_APPLICATION")) for e in
                       container.get("env", [])), f"{name}: no storage keys in the pods"
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert set(mounts.values()) <= set(volumes), name
    return total_gpus


def test_service_account_carries_the_workload_identity():
    sa = load_all(KUBERAY / "service-account.yaml")[0]
    assert sa["kind"] == "ServiceAccount" and sa["metadata"]["name"] == SERVICE_ACCOUNT
    notes = sa["metadata"]["annotations"]
    assert notes["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")  # IRSA
    assert notes["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")  # GKE workload identity


def test_shared_volume_is_read_write_many():
    pvc = load_all(KUBERAY / "storage.yaml")[0]
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "dipro-shared"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_raycluster():
    doc = kuberay_docs()["raycluster.yaml"]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert check_ray_cluster_spec(doc["spec"], needs_mlflow=True) >= 2


@pytest.mark.parametrize("name,needs_mlflow", [("rayjob-train.yaml", True), ("rayjob-regenerate-shards.yaml", False)])
def test_rayjobs(name, needs_mlflow):
    doc = kuberay_docs()[name]
    spec = doc["spec"]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())
    submitter_env = env_of(spec["submitterPodTemplate"]["spec"]["containers"][0])
    assert submitter_env["RAY_AUTH_MODE"]["value"] == "token"
    assert_secret(submitter_env, "RAY_AUTH_TOKEN")
    gpus = check_ray_cluster_spec(spec["rayClusterSpec"], needs_mlflow=needs_mlflow)
    check_dipro_command(spec["entrypoint"])
    argv = dipro_argv(spec["entrypoint"])
    if argv[0] == "train":
        cfg_path = argv[argv.index("--config") + 1].replace(IMAGE_PROJECT_DIR + "/", "")
        cfg: Config = load_config(REPO / cfg_path, [t for t in argv if "=" in t])
        assert cfg.trainer.use_gpu and cfg.trainer.num_workers == gpus, "one worker per GPU of the job's cluster"
        assert cfg.effective_batch_size == PAPER_EFFECTIVE_BATCH
        assert is_bucket(cfg.trainer.storage_path) and is_bucket(cfg.data.shards)
    else:
        assert argv[:2] == ["shards", "regenerate"] and gpus == 0
        assert is_bucket(argv[argv.index("--processed") + 1]) and is_bucket(argv[argv.index("--out") + 1])


def test_images_match_the_dockerfile():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py311-gpu$", dockerfile, re.M)
    assert f"WORKDIR {IMAGE_PROJECT_DIR}" in dockerfile
    assert dockerfile.index("torch==") < dockerfile.index("pip install --no-cache-dir -e .") < dockerfile.index(
        "--no-build-isolation deepspeed==")
    images = set(re.findall(r"image: (\S+)", "".join(p.read_text() for p in KUBERAY.glob("rayjob-*.yaml"))
                            + (KUBERAY / "raycluster.yaml").read_text()))
    assert len(images) == 1, images
