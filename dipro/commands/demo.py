"""``dipro demo``: the whole system on a synthetic cohort, on this machine's CPU.

synth -> prepare -> shard -> 2-worker DeepSpeed training (Ray Train, bf16 when
the CPU has native bf16, else fp32) -> evaluate on test -> register in MLflow
-> promote to champion -> predict, each stage printed with its progress, then
a summary: the metrics table and where the shards, checkpoints and MLflow
database are, with the command that opens the MLflow UI.

Idempotent: a second run reuses what is still valid.
* synth    is skipped when the raw dir's completion marker says it holds the
           requested cohort (same patients and seed);
* prepare  is skipped when ``processed/report.json`` exists and the raw files
           (path, size, mtime) are those it was built from (``demo_state.json``);
* shard    is skipped when the shards were built from this processed dir and
           ``dipro shards verify`` finds nothing wrong; otherwise only the
           stale or broken shards are rebuilt (``dipro shards regenerate``);
* train    is skipped when a registered version of ``dipro-{task}`` exists for
           this data fingerprint and config, unless ``--fresh``.
Everything lives under ``--out`` (default ``demo_output``), MLflow included
(``OUT/mlflow.db``), so the demo never touches another tracking server.

The terminal reads as a report (stages, progress bars, the table): what MLflow and
other libraries print goes to ``OUT/demo.log``, and the training run's Ray, DeepSpeed
and torch messages to its ``RUN/train.log`` (both paths are printed); a stage that
fails for a reason other than a user error prints the tail of ``OUT/demo.log``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dipro.defaults import DEMO_OUT, DEMO_PATIENTS

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
STATE_FILE = "demo_state.json"
LOG_FILE = "demo.log"
LIBRARY_LOGGERS = ("mlflow", "alembic", "ray", "urllib3", "matplotlib", "PIL")
"""Python loggers whose records go to ``OUT/demo.log`` instead of the terminal."""
TASK = "mortality"
NUM_WORKERS = 2
STAGES = ("synth", "prepare", "shard", "train", "evaluate", "register", "promote", "predict")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on a synthetic cohort on CPU (what `make demo` runs)",
        description=(
            "synth -> prepare -> shard -> 2-worker DeepSpeed training on CPU (configs/demo.yaml) -> evaluate on "
            "test -> register in MLflow -> promote to champion -> predict. A second run reuses every stage "
            "whose output is still valid; --fresh retrains."
        ),
    )
    p.add_argument("--out", default=DEMO_OUT, metavar="DIR",
                   help=f"folder for everything the demo writes (default: {DEMO_OUT})")
    p.add_argument("--patients", type=int, default=None, metavar="N",
                   help=f"synthetic patients to generate (default: {DEMO_PATIENTS})")
    p.add_argument("--seed", type=int, default=None, help="generator seed (default: the generator's)")
    p.add_argument("--fresh", action="store_true",
                   help="train a new model even if one is registered for this data and config")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------- small helpers

@dataclass
class Stage:
    """One printed stage: ``[3/8] shard ... done in 4.1 s`` (or ``reused: why``)."""

    index: int
    name: str
    t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def begin(cls, name: str, what: str) -> "Stage":
        stage = cls(STAGES.index(name) + 1, name)
        print(f"\n[{stage.index}/{len(STAGES)}] {name}: {what}", flush=True)
        return stage

    def reused(self, why: str) -> None:
        print(f"      reused: {why}", flush=True)

    def done(self, what: str = "") -> None:
        print(f"      done in {time.perf_counter() - self.t0:.1f} s" + (f": {what}" if what else ""), flush=True)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX on x86, BF16 on Arm), where bf16
    autocast pays off; elsewhere bf16 is emulated and slower than fp32.  ``cpuinfo``: the text of
    /proc/cpuinfo (read when None)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    if cpuinfo:
        return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(cpuinfo.split()))
    try:  # no /proc (macOS): ask oneDNN
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError, ImportError):
        return False


def tree_fingerprint(root: Path) -> str:
    """sha256 over (relative path, size, mtime) of every file under ``root``: changes when any input does."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def config_fingerprint(cfg) -> str:
    """sha256 of the resolved config without the run-specific keys (run name, paths, tracking)."""
    from dipro.config import to_dict

    d = to_dict(cfg)
    for key in ("run_name", "storage_path"):
        d["trainer"].pop(key, None)
    d["data"].pop("shards", None)
    d.pop("tracking", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


class State:
    """``OUT/demo_state.json``: what each stage was built from (written atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data: dict = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            self.data = {}

    def get(self, key: str):
        return self.data.get(key)

    def set(self, key: str, value) -> None:
        self.data[key] = value
        from data_sharding.atomic import write_text

        write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n")


@dataclass
class Paths:
    out: Path

    def __post_init__(self) -> None:
        self.out = self.out.expanduser().resolve()

    raw = property(lambda self: self.out / "raw")
    processed = property(lambda self: self.out / "processed")
    shards = property(lambda self: self.out / "shards")
    runs = property(lambda self: self.out / "runs")
    mlflow_db = property(lambda self: self.out / "mlflow.db")
    log = property(lambda self: self.out / LOG_FILE)
    predictions = property(lambda self: self.out / "predictions" / f"{TASK}-test.parquet")
    tracking_uri = property(lambda self: f"sqlite:///{self.mlflow_db}")


def _indent(text: str, prefix: str = "      ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


@contextlib.contextmanager
def _stderr_to(path: Path):
    """What a library writes to stderr itself (not through logging) appended to ``path``."""
    with open(path, "a", encoding="utf-8") as f, contextlib.redirect_stderr(f):
        yield


def _print_tail(path: Path, lines: int = 20) -> None:
    try:
        tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return
    if tail:
        print(f"last {len(tail)} lines of {path}:\n" + _indent("\n".join(tail), "  "), file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- stages

def stage_synth(paths: Paths, patients: int | None, seed: int | None) -> None:
    from data_sharding import synth

    patients = DEMO_PATIENTS if patients is None else patients
    seed = synth.DEFAULT_SEED if seed is None else seed
    stage = Stage.begin("synth", f"{patients} synthetic patients in the real MIMIC/ImaGenome layout -> {paths.raw}")
    marker = paths.raw / "SYNTH.json"  # written last, inside the atomically renamed directory
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = {}
        if (done.get("patients"), done.get("seed"), done.get("image_size")) == (
                patients, seed, synth.DEFAULT_IMAGE_SIZE) and done.get("counts"):
            stage.reused(f"{marker} records a complete cohort of {patients} patients, seed {seed}")
            return
    result = synth.generate(paths.raw, patients=patients, seed=seed, overwrite=True, progress=True)
    c = result.counts
    stage.done(f"{c['subjects']} subjects, {c['icu_stays']} ICU stays, {c['images']} images")


def stage_prepare(paths: Paths, state: State) -> None:
    stage = Stage.begin("prepare", f"cohort rules, labels, hourly EHR, patient split -> {paths.processed}")
    raw_fp = tree_fingerprint(paths.raw)
    if (paths.processed / "report.json").is_file() and state.get("prepare.raw_fingerprint") == raw_fp:
        stage.reused("processed/report.json exists and the raw files are the ones it was built from")
        return
    from data_sharding.prepare import PrepareOptions, prepare
    from data_sharding.readers import resolve_roots

    roots = resolve_roots(str(paths.raw), None, None, None)
    result = prepare(roots, paths.processed, PrepareOptions(overwrite=True, progress=True))
    c = result.counts
    state.set("prepare.raw_fingerprint", raw_fp)
    stage.done(f"{c['stays']} stays ({c['stays_per_split']}), {c['progression_pairs']} progression pairs, "
               f"{c['mortality_los_stays']} mortality/LOS samples; per-rule counts in processed/report.json")


def stage_shard(paths: Paths, crop_size: int, state: State) -> None:
    stage = Stage.begin("shard", f"{crop_size} px region crops + EHR windows -> WebDataset shards in {paths.shards}")
    from data_sharding.manifest import ShardSettings, manifest_path, read_manifest
    from data_sharding.verify import format_problems, verify_shards

    processed_fp = tree_fingerprint(paths.processed)
    exists = manifest_path(paths.shards).is_file()
    if exists and state.get("shard.processed_fingerprint") == processed_fp:
        problems = verify_shards(paths.shards, workers=os.cpu_count() or 1, progress=True)
        if not problems:
            stage.reused("built from this processed dir, and `dipro shards verify` finds every shard intact")
            return
        print(_indent(format_problems(problems)))
    if exists:
        from data_sharding.regenerate import regenerate

        print("      rebuilding only the shards whose inputs changed or that fail verification (Ray tasks)")
        report = regenerate(paths.processed, paths.shards, overrides={"crop_size": crop_size}, progress=True)
        what = f"{len(report.rebuilt)} shard(s) rebuilt, {len(report.unchanged)} unchanged"
    else:
        from data_sharding.shard_writer import write_shards

        manifest = write_shards(paths.processed, paths.shards, settings=ShardSettings(crop_size=crop_size),
                                progress=True)
        what = f"{len(manifest.records)} shard(s) written"
    state.set("shard.processed_fingerprint", processed_fp)
    print(_indent(read_manifest(paths.shards).summary_table()))
    stage.done(what)


@dataclass
class Model:
    """The model version the later stages use."""

    version: int
    checkpoint: str
    trained_now: bool
    test_metrics: dict = field(default_factory=dict)
    run_id: str | None = None


def find_registered(task: str, data_fp: str, cfg_fp: str, uri: str) -> Model | None:
    """A registered version trained on this data with this config (the champion if it is one)."""
    from data_sharding.errors import UserError
    from dipro.tracking.registry import list_versions

    try:
        rows = list_versions(task, uri)
    except UserError:  # no registered model yet
        return None
    rows = [r for r in rows if r.fingerprint == data_fp and r.tags.get("demo.config_sha256") == cfg_fp]
    if not rows:
        return None
    best = max(rows, key=lambda r: ("champion" in r.aliases, r.version))
    return Model(version=best.version, checkpoint=best.tags.get("checkpoint", ""), trained_now=False,
                 test_metrics=dict(best.test), run_id=best.run_id)


def stage_train(paths: Paths, cfg, cfg_fp: str, data_fp: str, fresh: bool):
    """Returns ``(Model or None, TrainResult or None)``: a reusable version, or the new run."""
    t = cfg.trainer
    stage = Stage.begin("train", f"{t.num_workers} Ray Train workers, DeepSpeed ZeRO-{t.zero_stage}, {t.precision} "
                                 f"on CPU, {t.max_epochs} epochs ({DEMO_CONFIG.name})")
    if not fresh:
        found = find_registered(cfg.task, data_fp, cfg_fp, paths.tracking_uri)
        if found is not None:
            stage.reused(f"dipro-{cfg.task} version {found.version} was trained on data {data_fp[:12]} with this "
                         "config (--fresh trains a new one)")
            return found, None
    from dipro.train import run_training

    result = run_training(cfg)
    stage.done(f"run {result.run_name}, {result.epochs_completed} epoch(s), best checkpoint {result.best_checkpoint}")
    return None, result


def stage_evaluate(model: Model | None, result, task: str) -> dict:
    stage = Stage.begin("evaluate", "the best checkpoint on the test split")
    if result is not None:  # the run evaluated its best checkpoint on test (dipro.train.launcher)
        metrics = dict(result.test.metrics)
        n = result.test.num_samples
    else:
        from dipro.train.evaluate import checkpoint_from_model_uri, evaluate_checkpoint

        ckpt = checkpoint_from_model_uri(f"models:/dipro-{task}/{model.version}")
        test = evaluate_checkpoint(ckpt, "test", progress=True)
        metrics, n = dict(test.metrics), test.num_samples
    stage.done(f"{n} test samples")
    return metrics


def stage_register(model: Model | None, result, cfg, cfg_fp: str, data_fp: str, test_metrics: dict,
                   uri: str, log: Path) -> Model:
    stage = Stage.begin("register", f"the best checkpoint as a new version of dipro-{cfg.task} in MLflow")
    if result is None:
        stage.reused(f"version {model.version} (already registered)")
        return model
    from mlflow import MlflowClient

    from dipro.tracking.registry import model_name, register_checkpoint

    with _stderr_to(log):  # MLflow prints "Successfully registered model ..." to stderr itself
        version = register_checkpoint(cfg, result.best_checkpoint, result.mlflow_run_id, test_metrics, data_fp)
        MlflowClient(tracking_uri=uri, registry_uri=uri).set_model_version_tag(
            model_name(cfg.task), str(version), "demo.config_sha256", cfg_fp)
    stage.done(f"dipro-{cfg.task} version {version}")
    return Model(version=version, checkpoint=str(result.best_checkpoint), trained_now=True,
                 test_metrics=test_metrics, run_id=result.mlflow_run_id)


def stage_promote(model: Model, task: str, uri: str) -> int:
    """Move @champion to ``model`` if the registry's gate allows it; return the champion's version."""
    stage = Stage.begin("promote", f"version {model.version} to @champion if it beats the current one")
    from data_sharding.errors import UserError
    from dipro.tracking.registry import list_versions, promote

    try:
        outcome = promote(task, model.version, "champion", uri=uri)
        print(f"      {outcome.message}")
    except UserError as exc:  # the gate refused: keep the champion we have
        print(f"      {exc}")
    champion = next((r.version for r in list_versions(task, uri) if "champion" in r.aliases), None)
    if champion is None:
        raise UserError(f"dipro-{task} has no @champion after promotion (see the message above)")
    stage.done(f"@champion = version {champion}")
    return champion


def stage_predict(paths: Paths, task: str, champion: int, data_fp: str, state: State) -> int:
    uri = f"models:/dipro-{task}@champion"
    stage = Stage.begin("predict", f"{uri} on the test shards -> {paths.predictions}")
    key = f"{champion}:{data_fp}"
    if paths.predictions.is_file() and state.get("predict.key") == key:
        import pyarrow.parquet as pq

        rows = pq.read_metadata(paths.predictions).num_rows
        stage.reused(f"{rows} predictions of version {champion} on these shards")
        return rows
    from dipro.tracking.predict import run_predict

    paths.predictions.parent.mkdir(parents=True, exist_ok=True)
    report = run_predict(uri, str(paths.shards), "test", str(paths.predictions), use_ray=False,
                         tracking_uri=paths.tracking_uri)
    state.set("predict.key", key)
    stage.done(f"{report.rows} per-sample predictions")
    return report.rows


def summary(paths: Paths, task: str, model: Model, champion: int, metrics: dict, n_predictions: int,
            seconds: float) -> str:
    from dipro.metrics import format_table

    lines = [
        "",
        f"DiPro demo finished in {seconds / 60:.1f} min. Test metrics of dipro-{task} version {model.version}"
        + (" (trained now)" if model.trained_now else " (reused)") + ":",
        "",
        format_table({f"DiPro demo v{model.version}": metrics}, task),
        "",
        f"  raw synthetic MIMIC files  {paths.raw}",
        f"  processed Parquet          {paths.processed}  (report.json: kept/dropped per cohort rule)",
        f"  WebDataset shards          {paths.shards}  (manifest.parquet)",
        f"  checkpoints                {paths.runs}" + (f"  (best: {model.checkpoint})" if model.checkpoint else ""),
        f"  MLflow database            {paths.mlflow_db}  (dipro-{task}: @champion = version {champion})",
        f"  predictions                {paths.predictions}  ({n_predictions} rows)",
        "",
        "Open the MLflow UI:",
        f"  mlflow ui --backend-store-uri {paths.tracking_uri} --host 127.0.0.1",
        "Registry from the command line:",
        f"  dipro registry list --task {task} --tracking-uri {paths.tracking_uri}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point

def run(args: argparse.Namespace) -> int:
    from dipro.config import load_config
    from data_sharding.errors import UserError

    if args.patients is not None and args.patients < 1:
        raise UserError(f"--patients must be >= 1, got {args.patients}")
    if not DEMO_CONFIG.is_file():
        raise UserError(f"demo config {DEMO_CONFIG} not found (run the demo from a checkout of the repository)")
    t0 = time.perf_counter()
    paths = Paths(Path(args.out))
    paths.out.mkdir(parents=True, exist_ok=True)
    state = State(paths.out / STATE_FILE)
    precision = "bf16" if cpu_has_native_bf16() else "fp32"
    cfg = load_config(DEMO_CONFIG, [
        f"data.shards={paths.shards}", f"trainer.storage_path={paths.runs}",
        f"trainer.num_workers={NUM_WORKERS}", "trainer.cpus_per_worker=1", "trainer.use_gpu=false",
        "trainer.strategy=deepspeed", f"trainer.precision={precision}",
        f"tracking.uri={paths.tracking_uri}", "tracking.register=false",
    ])
    print(f"DiPro demo -> {paths.out}  (task {cfg.task}; precision {precision}: this CPU "
          f"{'has' if precision == 'bf16' else 'lacks'} native bf16)")
    print(f"library messages (MLflow, Ray) go to {paths.log}; each training run's to its RUN/train.log")

    # The demo is self-contained: its own MLflow database and a local Ray, whatever the shell says.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    os.environ["MLFLOW_TRACKING_URI"] = paths.tracking_uri
    os.environ.pop("RAY_ADDRESS", None)
    import mlflow  # noqa: F401 (mlflow configures its loggers on import: take them over after that)
    import ray  # noqa: F401 (likewise)
    from data_sharding.ray_init import loggers_to_file

    try:
        with loggers_to_file(paths.log, LIBRARY_LOGGERS):
            model, champion, metrics, n_pred = _stages(args, paths, state, cfg)
    except UserError:
        raise
    except Exception:
        _print_tail(paths.log)
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    print(summary(paths, cfg.task, model, champion, metrics, n_pred, time.perf_counter() - t0))
    return 0


def _stages(args: argparse.Namespace, paths: Paths, state: State, cfg):
    """synth -> ... -> predict; returns what the summary shows."""
    stage_synth(paths, args.patients, args.seed)
    stage_prepare(paths, state)
    stage_shard(paths, cfg.model.crop_size, state)
    from dipro.tracking.provenance import data_fingerprint

    data_fp = data_fingerprint(paths.shards)
    cfg_fp = config_fingerprint(cfg)
    model, result = stage_train(paths, cfg, cfg_fp, data_fp, args.fresh)
    metrics = stage_evaluate(model, result, cfg.task)
    model = stage_register(model, result, cfg, cfg_fp, data_fp, metrics, paths.tracking_uri, paths.log)
    champion = stage_promote(model, cfg.task, paths.tracking_uri)
    n_pred = stage_predict(paths, cfg.task, champion, data_fp, state)
    return model, champion, metrics, n_pred
