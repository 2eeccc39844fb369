"""Fast unit tests of dipro.train: schedule, DeepSpeed config, precision policy, checkpoints, NaN check."""
from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dipro.config import load_config, replace
from data_sharding.errors import ConfigError, UserError
from dipro.train import checkpoint as ck
from dipro.train.optim import CosineWithWarmup, build_optimizer, build_scheduler, cosine_lr, epoch_cosine_lr
from dipro.train.precision import resolve_precision
from dipro.train.strategies import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]


def demo_cfg(*overrides):
    return load_config(ROOT / "configs" / "demo.yaml", ["tracking.enabled=false", *overrides])


# ----------------------------------------------------------------------------- schedule

def test_cosine_schedule_endpoints_and_midpoint():
    kw = dict(base_lr=1e-3, min_lr=1e-7, total_steps=100)
    assert cosine_lr(0, **kw) == pytest.approx(1e-3)
    assert cosine_lr(50, **kw) == pytest.approx(1e-7 + 0.5 * (1e-3 - 1e-7))
    assert cosine_lr(100, **kw) == pytest.approx(1e-7)
    assert cosine_lr(500, **kw) == pytest.approx(1e-7)  # stays at the floor
    lrs = [cosine_lr(s, **kw) for s in range(101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cosine_schedule_warmup_is_linear_then_decays():
    kw = dict(base_lr=1e-3, min_lr=0.0, total_steps=110, warmup_steps=10)
    assert [cosine_lr(s, **kw) for s in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert cosine_lr(10, **kw) == pytest.approx(1e-3)
    assert cosine_lr(60, **kw) == pytest.approx(0.5e-3)


def test_scheduler_state_round_trip_continues_on_the_same_curve():
    cfg = demo_cfg("optim.base_lr=0.01", "optim.scale_lr=false", "optim.min_lr=0.0001", "optim.warmup_steps=2",
                   "optim.schedule_interval=step")
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert isinstance(state["lr_lambdas"][0], dict)  # numbers, not a pickled closure
    opt2 = build_optimizer(model, cfg)
    sched2 = build_scheduler(opt2, cfg, total_steps=999)
    sched2.load_state_dict(state)
    opt2.load_state_dict(opt.state_dict())
    for _ in range(3):
        opt.step(); sched.step(); opt2.step(); sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(10, base_lr=0.01, min_lr=1e-4, total_steps=20,
                                                                warmup_steps=2))
    assert isinstance(CosineWithWarmup(1, 0, 10)(3), float)


def test_scaled_lr_for_1_and_4_workers():
    # the authors' main.py: lr = accumulate_grad_batches x ngpu x batch size x base_lr
    one = demo_cfg("optim.base_lr=1e-5", "optim.grad_accum=4", "data.batch_size=4", "trainer.num_workers=1")
    four = replace(one, ["trainer.num_workers=4"])
    assert one.effective_lr == pytest.approx(4 * 1 * 4 * 1e-5)  # 1.6e-4, the paper's mortality rate
    assert four.effective_lr == pytest.approx(4 * 4 * 4 * 1e-5)  # 6.4e-4: follows the effective batch
    assert "4 x workers 4 x micro batch 4" in four.describe_lr()
    fixed = replace(four, ["optim.scale_lr=false"])
    assert fixed.effective_lr == pytest.approx(1e-5) and "scale_lr=false" in fixed.describe_lr()
    model = torch.nn.Linear(3, 2)
    assert build_optimizer(model, four).param_groups[0]["lr"] == pytest.approx(6.4e-4)


def test_old_lr_key_says_to_use_base_lr():
    with pytest.raises(ConfigError, match=r"'optim\.lr' was renamed to optim\.base_lr"):
        demo_cfg("optim.lr=1e-3")


def test_per_epoch_cosine_holds_the_rate_for_an_epoch():
    # CosineAnnealingLR(T_max=4, eta_min=0) stepped per epoch, 3 optimizer steps per epoch:
    # epoch e runs at 0.5 lr (1 + cos(pi e / 4))
    kw = dict(base_lr=1.0, min_lr=0.0, steps_per_epoch=3, max_epochs=4)
    expected = [1.0] * 3 + [0.5 * (1 + math.cos(math.pi / 4))] * 3 + [0.5] * 3 + [0.5 * (1 + math.cos(3 * math.pi / 4))] * 3
    assert [epoch_cosine_lr(s, **kw) for s in range(12)] == pytest.approx(expected)
    cfg = demo_cfg("optim.base_lr=0.25", "optim.min_lr=0", "trainer.max_epochs=4", "trainer.num_workers=1",
                   "data.batch_size=4", "optim.grad_accum=1")  # effective lr 1.0
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=12)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(expected)
    # the same as torch's CosineAnnealingLR stepped at each epoch end
    ref_opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=4, eta_min=0.0)
    per_epoch = []
    for _ in range(4):
        per_epoch.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert seen[::3] == pytest.approx(per_epoch)
    with pytest.raises(ConfigError, match="schedule_interval=step"):
        demo_cfg("optim.warmup_steps=5")


def test_weight_decay_on_every_parameter_or_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = build_optimizer(model, demo_cfg()).param_groups  # the authors': AdamW over all parameters
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.01 and len(groups[0]["params"]) == 4
    groups = build_optimizer(model, demo_cfg("optim.decay_all_params=false")).param_groups
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[1]["weight_decay"] == 0.0


# ----------------------------------------------------------------------------- DeepSpeed config

@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_is_generated_from_the_run_config(stage):
    cfg = demo_cfg("trainer.strategy=deepspeed", f"trainer.zero_stage={stage}", "trainer.num_workers=4",
                   "data.batch_size=3", "optim.grad_accum=5", "optim.grad_clip=0.5", "trainer.precision=bf16")
    ds = deepspeed_config(cfg, "bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 4 * 5 == cfg.effective_batch_size
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert ds["fp16"]["enabled"] is False
    assert ds["zero_allow_untested_optimizer"] is True
    assert "offload_optimizer" not in ds["zero_optimization"]


def test_deepspeed_config_precision_and_offload():
    cfg = demo_cfg("trainer.strategy=deepspeed", "trainer.zero_stage=2", "trainer.offload_optimizer=true")
    ds = deepspeed_config(cfg, "fp16")
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert not ds["torch_autocast"]["enabled"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False
    fp32 = deepspeed_config(cfg, "fp32")
    assert not fp32["fp16"]["enabled"] and not fp32["torch_autocast"]["enabled"]
    with pytest.raises(ConfigError, match="zero_stage >= 1"):
        deepspeed_config(replace(cfg, ["trainer.zero_stage=0"]), "fp32")


def test_deepspeed_accepts_the_generated_config():
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = demo_cfg("trainer.strategy=deepspeed", "trainer.zero_stage=3", "optim.grad_accum=2")
    cfg = replace(cfg, ["trainer.num_workers=1"])
    parsed = DeepSpeedConfig(deepspeed_config(cfg, "bf16"))
    assert parsed.zero_optimization_stage == 3
    assert parsed.gradient_accumulation_steps == 2
    assert parsed.torch_autocast_enabled


# ----------------------------------------------------------------------------- precision

def test_fp16_on_cpu_is_refused_with_a_clear_message():
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_precision(demo_cfg("trainer.precision=fp16"))


def test_precision_policy():
    assert resolve_precision(demo_cfg("trainer.precision=bf16")) == "bf16"
    assert resolve_precision(demo_cfg("trainer.precision=fp32")) == "fp32"
    gpu = demo_cfg("trainer.use_gpu=true", "trainer.precision=bf16")
    assert resolve_precision(gpu, cuda_available=True, bf16_supported=False) == "fp32"  # documented fallback
    assert resolve_precision(gpu, cuda_available=True, bf16_supported=True) == "bf16"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_precision(gpu, cuda_available=False)


def test_launcher_validates_before_workers_start():
    from dipro.train.launcher import validate_config

    with pytest.raises(ConfigError, match="fp16"):
        validate_config(demo_cfg("trainer.precision=fp16"))
    with pytest.raises(ConfigError, match="strategy=deepspeed"):
        validate_config(demo_cfg("trainer.offload_optimizer=true"))


# ----------------------------------------------------------------------------- checkpoints

def _tiny_model(cfg):
    from dipro.model import build_model

    return build_model(cfg, None)


def test_checkpoint_round_trip_rebuilds_the_same_network(tmp_path):
    from dipro.model.synthetic import random_batch

    cfg = demo_cfg("model.dropout=0.0")
    torch.manual_seed(0)
    model = _tiny_model(cfg).eval()
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    ck.write_model_files(tmp_path / "c", state, cfg, {"note": "stats"}, {"epoch": 3, "global_step": 9})
    loaded = torch.load(tmp_path / "c" / ck.MODEL_FILE, weights_only=True)
    assert all(v.dtype != torch.float16 and v.dtype != torch.bfloat16 for v in loaded.values())
    model2, cfg2 = ck.load_model(tmp_path / "c", build_model=lambda c, s: _tiny_model(c))
    assert cfg2 == cfg
    batch = random_batch("mortality", batch_size=2, crop_size=cfg.model.crop_size, seed=1)
    with torch.no_grad():
        assert torch.equal(model(batch)["logits"], model2(batch)["logits"])
    meta = ck.read_meta(tmp_path / "c")
    assert meta["global_step"] == 9 and meta["format"] == ck.FORMAT_VERSION
    assert not list((tmp_path / "c").glob(".*tmp*"))  # atomic writes leave no temp files


def test_load_model_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="no model.pt"):
        ck.load_model(tmp_path)
    cfg = demo_cfg()
    ck.write_model_files(tmp_path / "bad", {"nope": torch.zeros(1)}, cfg, {}, {})
    with pytest.raises(UserError, match="does not match"):
        ck.load_model(tmp_path / "bad", build_model=lambda c, s: _tiny_model(c))


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    ck.atomic_torch_save(ck.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    ck.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_find_last_checkpoint_skips_incomplete_ones(tmp_path):
    cfg = demo_cfg()
    run = tmp_path / "runs" / "r1"
    for step, world, complete in ((3, 2, True), (6, 2, True), (8, 2, False)):
        d = run / f"checkpoint_s{step:08d}"
        ck.write_model_files(d, {}, cfg, {}, {"global_step": step, "world_size": world, "kind": "step"})
        for r in range(world if complete else 1):  # the last one misses rank 1's files
            ck.atomic_torch_save(ck.rng_state(), ck.rng_file(d, r))
    assert ck.find_last_checkpoint(tmp_path / "runs", "r1").name == "checkpoint_s00000006"
    with pytest.raises(UserError, match="not found"):
        ck.find_last_checkpoint(tmp_path / "runs", "nope")


def test_replace_dir_atomically_swaps_content(tmp_path):
    (tmp_path / "a").mkdir(); (tmp_path / "a" / "x").write_text("1")
    (tmp_path / "b").mkdir(); (tmp_path / "b" / "y").write_text("2")
    ck.replace_dir_atomically(tmp_path / "a", tmp_path / "best")
    ck.replace_dir_atomically(tmp_path / "b", tmp_path / "best")
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "best"]


# ----------------------------------------------------------------------------- loop pieces

def test_non_finite_loss_names_step_and_the_offending_micro_batches():
    from dipro.train.loop import NonFiniteLossError, check_finite_window

    cpu = torch.device("cpu")
    keys = [["s1_0", "s2_3"], ["s4_1", "s5_0"], ["s6_2", "s7_7"]]
    check_finite_window([torch.tensor(1.5), torch.tensor(0.2), torch.tensor(3.0)], keys, step=4, epoch=0, device=cpu)
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 7 \(epoch 2\)") as err:
        check_finite_window([torch.tensor(1.5), torch.tensor(float("inf")), torch.tensor(float("nan"))], keys,
                            step=7, epoch=2, device=cpu)
    msg = str(err.value)
    assert "s4_1" in msg and "s7_7" in msg and "s1_0" not in msg  # only the non-finite micro batches


def test_running_sums_stay_on_the_device_and_average_on_read():
    from dipro.train.loop import _Running

    window, epoch = _Running(), _Running()
    window.add({"total": torch.tensor(1.0), "task_ce": torch.tensor(0.5)})
    window.add({"total": torch.tensor(3.0), "task_ce": torch.tensor(1.5)})
    assert isinstance(window.total, torch.Tensor) and window.n == 2
    epoch.merge(window)
    epoch.merge(window)
    assert window.means() == {"train/task_ce": 1.0, "train/total": 2.0}
    assert epoch.global_means(torch.device("cpu")) == {"train/task_ce": 1.0, "train/total": 2.0} and epoch.n == 4
    with pytest.raises(RuntimeError, match="terms changed"):
        window.add({"total": torch.tensor(1.0)})


def test_finalize_merges_rank_parts_once_per_sample():
    from dipro.train.evaluate import finalize

    def part(keys, y, p):
        return {"keys": keys, "y_true": np.array(y), "y_prob": np.array(p), "stay_ids": np.arange(len(keys)),
                "attention": np.full((len(keys), 10), 0.1), "loss_sum": float(len(keys)), "count": len(keys)}

    res = finalize([part(["b", "a"], [1, 0], [0.9, 0.2]), part(["c", "a"], [1, 0], [0.6, 0.2])], "mortality", "val")
    assert res.sample_keys == ["a", "b", "c"]
    assert res.y_true.tolist() == [0, 1, 1]
    assert res.metrics["auroc"] == pytest.approx(1.0)
    assert res.metrics["loss"] == pytest.approx(1.0)
    with pytest.raises(UserError, match="no val samples"):
        finalize([part([], [], [])], "mortality", "val")


def test_commands_are_registered_with_help(capsys):
    from dipro import cli

    for cmd in ("train", "evaluate", "experiment"):
        with pytest.raises(SystemExit) as exc:
            cli.main([cmd, "--help"])
        assert exc.value.code == 0
    assert "--resume" in capsys.readouterr().out


def test_command_module_imports_only_stdlib():
    import ast

    tree = ast.parse((ROOT / "dipro" / "commands" / "train.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = {a.name for n in top if isinstance(n, ast.Import) for a in n.names} | {
        n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
    # argparse and the dependency-free helpers every parser shares (tests/test_cli.py checks they stay light)
    assert modules <= {"argparse", "__future__", "dipro.commands._args"}, modules


def test_missing_imagenet_weights_stop_the_driver_before_ray_starts(tmp_path, monkeypatch):
    import urllib.error

    sys.path.insert(0, str(ROOT / "tests"))
    import processed_fixture

    from dipro.train import launcher

    shards = processed_fixture.make_training_shards(tmp_path / "data")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(launcher, "init_ray", lambda cfg: pytest.fail("Ray was started"))
    cfg = demo_cfg("task=length_of_stay", f"data.shards={shards}", f"trainer.storage_path={tmp_path / 'runs'}",
                   "model.backbone=resnet18", "model.backbone_weights=imagenet")
    with pytest.raises(UserError, match=r"resnet18-f37072fd\.pth.*model\.backbone_weights=/path/to/"):
        launcher.launch(cfg)
