"""Typed run configuration: dataclasses loaded from YAML with ``key=value`` overrides.

Every command that trains or evaluates resolves one :class:`Config`:

    cfg = load_config("configs/mortality.yaml", ["trainer.num_workers=2", "seed=29"])

* Fields are documented where they are declared and validated in ``__post_init__``.
* An unknown key (in YAML or an override) is a :class:`~data_sharding.errors.ConfigError`
  naming the key and the keys that are allowed there.
* Override values are parsed as YAML scalars (``1e-5``, ``true``, ``[1,2]``, ``null``).
* The resolved config round-trips through :func:`to_dict` / :func:`from_dict` and is
  saved with every run (``config.yaml``).
Defaults are the paper's full configuration (except ``model.backbone_weights``, None by default so
that a bare config never reaches for the network; the task configs set ``imagenet``);
``configs/demo.yaml`` shrinks it for CPU.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from data_sharding.constants import TASKS  # re-exported: one source
from data_sharding.errors import ConfigError
from data_sharding.storage import redact, resolve as resolve_location
from dipro.defaults import PRECISIONS, STORAGE_PATH

# The validation metric that drives best-checkpoint selection and early stopping.
TASK_MONITOR = {
    "disease_progression": "f1_macro",
    "mortality": "auprc",
    "length_of_stay": "accuracy",
}


@dataclass
class DataConfig:
    shards: str = "demo_output/shards"
    """Shard root written by ``dipro shard`` (holds manifest.parquet)."""
    batch_size: int = 4
    """Micro batch per worker."""
    num_loader_workers: int = 2
    """DataLoader worker processes per training worker."""
    shuffle_buffer: int = 256
    """Training shuffle buffer of a rank, in samples (0 disables shuffling); split over its loader workers."""
    shuffle_buffer_mb: float = 256.0
    """Training shuffle buffer of a rank, in MiB of raw samples; split over its loader workers.
    A rank's loader holds about this plus (workers x 5 x one batch of crops) in RAM (README, Memory)."""
    max_corrupt_fraction: float = 0.01
    """Stop the run when more than this fraction of samples in an epoch is corrupt."""
    augment: bool = True
    """Training augmentations (never applied to evaluation)."""
    max_cxrs: int = 14
    """Upper bound on CXRs per sample (the cohort rule's 14)."""
    cache_dir: str | None = None
    """Local directory for whole copies of bucket shards (``data.shards=s3://...`` / ``gs://...``), shared
    by the loader workers and ranks of a node: each shard is downloaded once per node instead of streamed
    every epoch (dipro/data/shard_cache.py). None = stream only. Ignored for local shard directories."""
    cache_max_gb: float = 50.0
    """Size bound of ``data.cache_dir`` in GiB (least recently used shards are deleted to stay under it)."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size must be >= 1")
        _check(self.cache_max_gb > 0, "data.cache_max_gb must be > 0")
        _check(self.num_loader_workers >= 0, "data.num_loader_workers must be >= 0")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0 (0 disables shuffling)")
        _check(self.shuffle_buffer_mb > 0, "data.shuffle_buffer_mb must be > 0")
        _check(0.0 <= self.max_corrupt_fraction <= 1.0, "data.max_corrupt_fraction must be in [0, 1]")
        _check(2 <= self.max_cxrs <= 14, "data.max_cxrs must be in [2, 14]")


INPUT_SCALINGS = ("unit", "imagenet")
AUTO = "auto"
AUTO_SWITCH = (AUTO, True, False)


def resolve_auto(value: bool | str, device_type: str) -> bool:
    """An ``auto|true|false`` switch (``model.compile``, ``model.channels_last``) for a device type:
    ``auto`` is on for ``cuda`` and off anywhere else; true/false are kept."""
    if value == AUTO:
        return device_type == "cuda"
    if isinstance(value, bool):
        return value
    raise ConfigError(f"expected auto|true|false, got {value!r}")
PAIR_REVERSALS = ("swap", "interleave")
BACKBONE_WEIGHTS_IMAGENET = "imagenet"


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    """Region encoder: resnet50 (paper) | resnet34 | resnet18 | tiny (a 4-layer CNN for tests)."""
    backbone_weights: str | None = None
    """imagenet: torchvision's ImageNet weights of the backbone (IMAGENET1K_V1, read from the torch hub
    cache $TORCH_HOME/hub/checkpoints, downloaded there once when missing) | a local state-dict file |
    none = random init (logged)."""
    input_scaling: str = "unit"
    """Crop intensities fed to the backbone: unit = pixel / 255 in [0, 1] (the authors' ToTensor, no mean/std) |
    imagenet = standardised with the ImageNet mean/std averaged over RGB."""
    crop_size: int = 224
    """Side of the square region crops fed to the backbone."""
    d_model: int = 256
    num_layers: int = 2
    """The authors' ``num_transformer_layers``: local fusion has num_layers // 2 region-aware attention
    layers; the EHR encoder and the final fusion have one layer each, as the authors built them."""
    num_heads: int = 8
    """Attention heads everywhere (the authors' modules fix 8)."""
    dropout: float = 0.1
    group_k: int = 8
    """K of the group embedding of static features with demographics."""
    pair_reversal: str = "interleave"
    """PAE's reversed pair: interleave = the authors' code (their released weights were trained so), which
    stacks the two halves feature by feature (F_{t+1,1}, F_{t,1}, F_{t+1,2}, ...) | swap = [F_{t+1} || F_t]
    (the paper's equation and the code's stated intent). Logits are the same either way; the static-order
    and reversed PAE loss terms differ."""
    init_from: str | None = None
    """Fine-tuning: a checkpoint directory (a run's ``best/``, a ``dipro import-authors`` output, holding
    model.pt and config.yaml) whose weights initialise the network before training; optimizer, schedule,
    step and early stopping start fresh (unlike ``--resume``), class weights come from this run's shards.
    Its task and sizes must match this config; model.backbone_weights is then not read."""
    channels_last: bool | str = "auto"
    """Region encoder tensors in channels-last memory format: auto = on where the process has CUDA
    (faster convolutions on tensor cores), off on CPU | true | false. Same weights either way."""
    compile: bool | str = "auto"
    """``torch.compile`` the training step (forward + loss, one graph, no graph breaks): auto = on for a
    CUDA device, off on CPU | true | false. Compiled before DDP/DeepSpeed wrap it; the first step's compile
    time is printed and logged (MLflow ``compile_time_s``)."""
    compile_backend: str = "inductor"
    """torch.compile backend with model.compile: inductor (generated kernels) | aot_eager | eager
    (tracing only; what the CPU tests use)."""
    activation_checkpointing: bool = False
    """Recompute the backbone's stages in the backward pass instead of keeping their activations
    (torch.utils.checkpoint, non-reentrant): much less GPU memory for the same loss and gradients,
    about one more backbone forward of time. For long sequences (batch 4 x 14 CXRs) on < 40 GiB GPUs."""
    encoder_chunk: int = 0
    """Crops per backbone call (0 = every crop of the batch in one call, as the authors). With
    model.activation_checkpointing each chunk is recomputed on its own in the backward pass, so the
    backbone's activation memory is one chunk's: the switch for GPUs where checkpointing the stages is
    not enough. In training the backbone's BatchNorm then normalises each chunk with its own batch
    statistics (as smaller batches would); evaluation is unchanged. Under torch.compile the encoder runs
    eagerly (one graph break) when this is set."""
    # --- ablation switches (the paper's ablations) ---
    use_ehr: bool = True
    """False = CXR only."""
    last_cxr_only: bool = False
    """Use only the last two CXRs (the "Last" column of the paper's ICU table)."""
    use_pae: bool = True
    """Progression-aware enhancement (reversed pairs)."""
    use_std_losses: bool = True
    """Orthogonality and temporal-consistency losses."""
    local_fusion: bool = True
    global_fusion: bool = True

    def __post_init__(self) -> None:
        _check(self.backbone in ("resnet50", "resnet34", "resnet18", "tiny"),
               f"model.backbone must be resnet50|resnet34|resnet18|tiny, got {self.backbone!r}")
        _check(not (self.backbone == "tiny" and self.backbone_weights == BACKBONE_WEIGHTS_IMAGENET),
               "model.backbone_weights=imagenet needs a ResNet backbone (there are no ImageNet weights for tiny)")
        _check(self.input_scaling in INPUT_SCALINGS,
               f"model.input_scaling must be unit|imagenet, got {self.input_scaling!r}")
        _check(self.pair_reversal in PAIR_REVERSALS,
               f"model.pair_reversal must be swap|interleave, got {self.pair_reversal!r}")
        _check(self.d_model % self.num_heads == 0, "model.d_model must be divisible by model.num_heads")
        _check(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")
        _check(self.channels_last in AUTO_SWITCH, f"model.channels_last must be auto|true|false, got {self.channels_last!r}")
        _check(self.compile in AUTO_SWITCH, f"model.compile must be auto|true|false, got {self.compile!r}")
        _check(self.compile_backend in ("inductor", "aot_eager", "eager"),
               f"model.compile_backend must be inductor|aot_eager|eager, got {self.compile_backend!r}")
        _check(self.crop_size >= 16, "model.crop_size must be >= 16")
        _check(self.group_k >= 1, "model.group_k must be >= 1")
        _check(self.init_from is None or str(self.init_from).strip() != "",
               "model.init_from must be a checkpoint directory or null")
        _check(isinstance(self.encoder_chunk, int) and not isinstance(self.encoder_chunk, bool)
               and (self.encoder_chunk == 0 or self.encoder_chunk >= 2),
               f"model.encoder_chunk must be 0 (all crops at once) or an integer >= 2, got {self.encoder_chunk!r}")
        _check(self.num_layers >= 1, "model.num_layers must be >= 1")
        _check(not (self.use_ehr and self.local_fusion and self.num_layers < 2),
               "model.num_layers must be >= 2: local fusion has num_layers // 2 region-aware attention layers "
               "(or set model.local_fusion=false)")


@dataclass
class LossConfig:
    """Weights of the paper's total loss (authors' settings table)."""
    lambda_ce: float = 2.0
    """Task cross-entropy (progression / mortality BCE / LOS CE)."""
    orth: float = 1.0
    """L_orth (STD)."""
    consistency: float = 0.0
    """L_temp, temporal consistency of static features (STD)."""
    static_order: float = 0.5
    """lambda_static: ||S - S_reversed||^2 inside L_PAE."""
    dynamic_order: float = 2.0
    """Weight of the region-level progression CE (original + reversed) inside L_PAE."""

    def __post_init__(self) -> None:
        for f in fields(self):
            _check(getattr(self, f.name) >= 0, f"loss.{f.name} must be >= 0")


SCHEDULE_INTERVALS = ("epoch", "step")


@dataclass
class OptimConfig:
    """AdamW with cosine decay, as the authors trained (github.com/Chenliu-svg/DiPro main.py,
    models/Base_Predictor.py: configure_optimizers)."""
    base_lr: float = 5e-6
    """Base learning rate (the authors' ``model.base_learning_rate``)."""
    scale_lr: bool = True
    """lr = base_lr x optim.grad_accum x trainer.num_workers x data.batch_size (the authors' ``--scale_lr``,
    on by default), so the rate follows the effective batch; false = lr = base_lr."""
    weight_decay: float = 0.01
    decay_all_params: bool = True
    """Weight decay on every parameter (the authors' AdamW over ``model.parameters()``); false = not on
    biases, norm scales and other rank-1 parameters."""
    min_lr: float = 1e-7
    """Cosine decay floor."""
    schedule_interval: str = "epoch"
    """epoch: the cosine steps once per epoch over trainer.max_epochs (the authors' CosineAnnealingLR,
    T_max = max_epochs) | step: once per optimizer step over the whole run."""
    warmup_steps: int = 0
    """Linear warm-up (optimizer steps; schedule_interval=step only)."""
    grad_accum: int = 4
    grad_clip: float = 0.0
    """Max global gradient norm (0 disables; the authors set none)."""

    def __post_init__(self) -> None:
        _check(self.base_lr > 0, "optim.base_lr must be > 0")
        _check(self.min_lr >= 0, "optim.min_lr must be >= 0")
        _check(self.grad_accum >= 1, "optim.grad_accum must be >= 1")
        _check(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables)")
        _check(self.schedule_interval in SCHEDULE_INTERVALS,
               f"optim.schedule_interval must be epoch|step, got {self.schedule_interval!r}")
        _check(not (self.warmup_steps > 0 and self.schedule_interval == "epoch"),
               "optim.warmup_steps needs optim.schedule_interval=step")


@dataclass
class TrainerConfig:
    num_workers: int | str = 1
    """Ray Train workers (one process per GPU, or per CPU slot); ``"MIN-MAX"`` (e.g. ``2-8``) for an
    elastic group that starts with as many as fit, up to MAX, and continues on what is left (not
    below MIN) when nodes go (Ray Train's ``ScalingConfig(num_workers=(MIN, MAX))``; DDP only)."""
    placement_strategy: str = "PACK"
    """Ray placement group strategy of the worker group: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    (SPREAD puts the ranks on different nodes where it can)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    """GPUs per Ray Train worker with ``use_gpu`` (Ray's ``resources_per_worker``). Below 1 several ranks
    share one GPU (0.5 = two ranks per GPU), e.g. to run multi-rank code paths on a one-GPU machine;
    DDP then uses gloo (NCCL refuses two ranks on one device); DeepSpeed needs whole GPUs."""
    strategy: str = "ddp"
    """ddp | deepspeed."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """DeepSpeed ZeRO optimizer offload to CPU."""
    precision: str = "bf16"
    """bf16 | fp16 | fp32 (fp16 needs a GPU)."""
    max_epochs: int = 100
    max_steps_per_epoch: int | None = None
    """Cap on optimizer steps per epoch (None = one pass over the training shards)."""
    patience: int = 10
    """Early stopping on the task's validation monitor."""
    checkpoint_every_n_steps: int = 0
    """Extra checkpoints every N optimizer steps inside an epoch (0 = only per epoch)."""
    num_to_keep: int = 2
    max_failures: int = 0
    """Ray FailureConfig: worker-group restarts from the last checkpoint (a worker or its node died)."""
    schedule_timeout_s: float = 300.0
    """Longest wait for the worker group to be placed and started (at the start and after every
    failure); then the run fails with a line naming what it asked for and what the cluster has."""
    max_preemption_failures: int = -1
    """Restarts after node preemptions (spot reclaims, drains), counted apart from max_failures;
    -1 = unlimited (Ray FailureConfig.max_preemption_failures)."""
    preemption_grace_s: float = 0.0
    """How long surviving workers may keep running past a preemption deadline (Ray FailureConfig)."""
    storage_path: str = STORAGE_PATH
    """Where run directories go (checkpoints, best/, train.log, summary.json): a local path, or an s3:// / gs://
    URI (Ray Train's storage filesystem comes from data_sharding/storage.py). Must be shared by every node on a
    cluster: a bucket, or an NFS mount at the same path."""
    run_name: str | None = None
    """Unique run name; generated when None."""
    log_every_n_steps: int = 10

    def __post_init__(self) -> None:
        self.num_workers = parse_num_workers(self.num_workers)
        _check(self.placement_strategy in PLACEMENT_STRATEGIES,
               f"trainer.placement_strategy must be {'|'.join(PLACEMENT_STRATEGIES)}, got {self.placement_strategy!r}")
        _check(self.schedule_timeout_s > 0, "trainer.schedule_timeout_s must be > 0")
        _check(self.max_preemption_failures >= -1, "trainer.max_preemption_failures must be >= -1 (-1 = unlimited)")
        _check(self.preemption_grace_s >= 0, "trainer.preemption_grace_s must be >= 0")
        _check(not (self.elastic and self.strategy == "deepspeed"),
               f"trainer.num_workers={self.num_workers} (elastic) needs trainer.strategy=ddp: DeepSpeed's "
               "partitioned checkpoints resume only with the worker count that saved them")
        _check(self.strategy in ("ddp", "deepspeed"), f"trainer.strategy must be ddp|deepspeed, got {self.strategy!r}")
        _check(self.gpus_per_worker > 0 and (self.gpus_per_worker <= 1 or float(self.gpus_per_worker).is_integer()),
               f"trainer.gpus_per_worker must be in (0, 1] or a whole number, got {self.gpus_per_worker}")
        _check(not (self.shares_gpu and self.strategy == "deepspeed"),
               f"trainer.gpus_per_worker={self.gpus_per_worker} (ranks sharing a GPU) needs trainer.strategy=ddp: "
               "DeepSpeed's collectives need NCCL, which refuses two ranks on one GPU")
        _check(self.zero_stage in (0, 1, 2, 3), "trainer.zero_stage must be 0, 1, 2 or 3")
        _check(self.precision in PRECISIONS, f"trainer.precision must be {'|'.join(PRECISIONS)}, got {self.precision!r}")
        _check(self.max_epochs >= 1, "trainer.max_epochs must be >= 1")
        _check(self.max_failures >= -1, "trainer.max_failures must be >= -1 (-1 = unlimited)")
        _check(self.num_to_keep >= 1, "trainer.num_to_keep must be >= 1")
        try:
            resolve_location(self.storage_path)
        except ConfigError as exc:  # an unknown scheme, a URI carrying credentials or options
            raise ConfigError(f"trainer.storage_path: {exc}") from None

    @property
    def shares_gpu(self) -> bool:
        """True when ranks share GPUs (``use_gpu`` with ``gpus_per_worker`` < 1): DDP over gloo."""
        return self.use_gpu and self.gpus_per_worker < 1

    @property
    def dist_backend(self) -> str:
        """torch.distributed backend of the worker group: nccl on whole GPUs, gloo on CPU or shared GPUs."""
        return "nccl" if self.use_gpu and not self.shares_gpu else "gloo"

    @property
    def elastic(self) -> bool:
        """True for a ``MIN-MAX`` worker count."""
        return isinstance(self.num_workers, str)

    @property
    def min_workers(self) -> int:
        return worker_range(self.num_workers)[0]

    @property
    def max_workers(self) -> int:
        return worker_range(self.num_workers)[1]


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def worker_range(num_workers: int | str) -> tuple[int, int]:
    """``2`` -> (2, 2); ``"1-4"`` -> (1, 4) (already validated by :func:`parse_num_workers`)."""
    if isinstance(num_workers, int):
        return num_workers, num_workers
    lo, hi = num_workers.split("-")
    return int(lo), int(hi)


def parse_num_workers(value: int | str) -> int | str:
    """A worker count ``N >= 1`` (int) or an elastic range ``"MIN-MAX"`` with 1 <= MIN <= MAX (``"3-3"`` is 3)."""
    if isinstance(value, int):
        _check(value >= 1, "trainer.num_workers must be >= 1")
        return value
    text = str(value).strip().replace(" ", "")
    if text.isdigit():
        return parse_num_workers(int(text))
    lo, sep, hi = text.partition("-")
    _check(sep == "-" and lo.isdigit() and hi.isdigit(),
           f"trainer.num_workers must be a count (2) or a range MIN-MAX (2-8), got {value!r}")
    _check(1 <= int(lo) <= int(hi), f"trainer.num_workers={value}: need 1 <= MIN <= MAX")
    if int(lo) == int(hi):
        return int(lo)
    return f"{int(lo)}-{int(hi)}"


@dataclass
class StorageConfig:
    """Object-storage endpoints (data_sharding/storage.py). Credentials are never config keys: they come from
    the standard chains (AWS_* variables, ~/.aws, the node's IAM role / IRSA; GCP workload identity,
    GOOGLE_APPLICATION_CREDENTIALS), so nothing secret is saved with a run."""
    s3_endpoint: str | None = None
    """S3-compatible endpoint for s3:// locations, e.g. http://minio.internal:9000 (MinIO, Ceph, a test server);
    None = $DIPRO_S3_ENDPOINT, else $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, else AWS itself. Applied in the
    driver and in every Ray worker before it touches storage."""
    gcs_endpoint: str | None = None
    """GCS endpoint for gs:// locations (an emulator or a private endpoint); None = $DIPRO_GCS_ENDPOINT /
    $STORAGE_EMULATOR_HOST, else Google's own."""

    def __post_init__(self) -> None:
        for name in ("s3_endpoint", "gcs_endpoint"):
            value = getattr(self, name)
            if value is None:
                continue
            parts = urlsplit(value if "://" in value else f"http://{value}")
            _check(parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.query
                   and "@" not in parts.netloc and parts.path in ("", "/"),
                   f"storage.{name} must be http(s)://HOST[:PORT] (no credentials, path or options), got "
                   f"{redact(value)!r}")

    def apply(self) -> None:
        """Point this process's storage layer (and the Ray workers and subprocesses it starts) at these endpoints."""
        from data_sharding import storage

        storage.configure(s3_endpoint=self.s3_endpoint, gcs_endpoint=self.gcs_endpoint)


@dataclass
class TrackingConfig:
    uri: str | None = None
    """MLflow tracking URI; None = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the working directory."""
    experiment: str = "dipro"
    register: bool = True
    """Register the best checkpoint as a new version of dipro-{task}."""
    enabled: bool = True
    system_metrics: bool | None = None
    """MLflow system metrics of training runs (``system/...``: CPU, memory, disk, network, and GPU utilisation
    and memory through nvidia-ml-py where the node has a GPU), sampled on rank 0's node; None = on when the
    tracking server is remote (http/https), off for a local sqlite store."""
    system_metrics_interval_s: float = 10.0
    """Seconds between two system-metrics samples."""

    def __post_init__(self) -> None:
        _check(self.system_metrics_interval_s > 0, "tracking.system_metrics_interval_s must be > 0")


@dataclass
class Config:
    task: str = "mortality"
    """disease_progression | mortality | length_of_stay."""
    seed: int = 23
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        _check(self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        _check(not (self.model.compile is True and self.zero3),
               "model.compile=true is not supported with trainer.strategy=deepspeed trainer.zero_stage=3 (ZeRO-3 "
               "gathers parameters in module hooks during forward); use zero_stage 2, or model.compile=auto|false")

    @property
    def zero3(self) -> bool:
        return self.trainer.strategy == "deepspeed" and self.trainer.zero_stage == 3

    @property
    def monitor(self) -> str:
        """Validation metric (higher is better) for checkpoint selection / early stopping."""
        return TASK_MONITOR[self.task]

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step; with an elastic worker count, at the largest group."""
        return self.data.batch_size * self.trainer.max_workers * self.optim.grad_accum

    @property
    def effective_lr(self) -> float:
        """The optimizer's peak learning rate: base_lr x effective batch with ``optim.scale_lr``
        (github.com/Chenliu-svg/DiPro main.py: accumulate_grad_batches x ngpu x batch size x base_lr)."""
        if self.optim.scale_lr:
            return self.optim.base_lr * self.effective_batch_size
        return self.optim.base_lr

    def describe_lr(self) -> str:
        """One line saying how the learning rate was obtained (printed at the start of a run)."""
        if not self.optim.scale_lr:
            return f"learning rate {self.effective_lr:.3g} = optim.base_lr (optim.scale_lr=false)"
        return (f"learning rate {self.effective_lr:.3g} = accumulation {self.optim.grad_accum} x workers "
                f"{self.trainer.max_workers} x micro batch {self.data.batch_size} x base_lr {self.optim.base_lr:.3g}"
                + (" (elastic: at the largest group; the rate is not rescaled when the group shrinks)"
                   if self.trainer.elastic else ""))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# ----------------------------------------------------------------------------- I/O

def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the declared field type, naming the key on error."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: expected {tp}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
    return value


# Keys that were renamed or removed: using one is an error that says what to write instead.
RENAMED_KEYS = {
    "optim.lr": "renamed to optim.base_lr: the learning rate is base_lr x optim.grad_accum x trainer.num_workers x "
                "data.batch_size while optim.scale_lr=true (the default, as the authors scaled it); "
                "set optim.scale_lr=false to use optim.base_lr as the rate itself",
    "model.variant": "removed: the model is the authors' computation (docs/FIDELITY.md); the 'extended' variant "
                     "did not beat it side by side (README, benchmarks/variants.py) and was dropped",
}


def from_dict(data: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Build a (nested) config dataclass from a plain dict; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r}: expected a mapping, got {data!r}")
    hints = _field_types(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    for key in unknown:
        if prefix + key in RENAMED_KEYS:
            raise ConfigError(f"config key {prefix + key!r} was {RENAMED_KEYS[prefix + key]}")
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r} (allowed under {prefix.rstrip('.') or 'the root'}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        if is_dataclass(tp):
            kwargs[name] = from_dict(value or {}, tp, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["trainer.num_workers=2", "model.use_ehr=false"]`` -> nested dict."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return nested


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML config file; ``base: other.yaml`` (relative path) is merged underneath."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:
        data = _deep_merge(load_yaml(p.parent / base), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve a config: dataclass defaults <- YAML file (with ``base``) <- overrides."""
    data = load_yaml(path) if path is not None else {}
    data = _deep_merge(data, parse_overrides(list(overrides)))
    return from_dict(data)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically, without the credentials of ``tracking.uri``."""
    from data_sharding.atomic import write_text
    from dipro.tracking.uri import redact_config

    write_text(path, yaml.safe_dump(redact_config(to_dict(cfg)), sort_keys=False))


def replace(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A copy of ``cfg`` with ``key=value`` overrides applied (validated again)."""
    return from_dict(_deep_merge(to_dict(cfg), parse_overrides(list(overrides))))
