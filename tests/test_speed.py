"""GPU speed features tested on CPU: the auto switches, the training step as one compiled graph,
activation checkpointing, the AdamW implementation choice and ranks sharing a GPU (config side).

Compilation uses the ``aot_eager`` backend (traces forward and backward like inductor, without
generating kernels), so a graph break or a host synchronisation inside the step fails here
without a GPU.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_sharding.constants import NUM_REGIONS
from data_sharding.errors import ConfigError
from dipro.config import LossConfig, ModelConfig, load_config, resolve_auto
from dipro.data.augment import AUGMENT_KEYS, draw_augmentation
from dipro.model import DiPro
from dipro.model.std import masked_mean
from dipro.model.synthetic import random_batch, uniform_label_stats


def small_cfg(**overrides) -> ModelConfig:
    base = dict(backbone="tiny", crop_size=32, d_model=32, num_layers=2, num_heads=4, group_k=4, dropout=0.0)
    base.update(overrides)
    return ModelConfig(**base)


def make_model(task: str = "mortality", seed: int = 0, **overrides) -> DiPro:
    torch.manual_seed(seed)
    return DiPro(small_cfg(**overrides), task, uniform_label_stats(), LossConfig(consistency=1.0)).train()


def train_batch(task: str, cxrs, steps, seed: int = 0, crop_size: int = 32) -> dict:
    """A batch as the training loader hands it over: with augmentation parameters, tensors only."""
    b = len(cxrs)
    batch = random_batch(task, b, cxrs, steps, crop_size=crop_size, seed=seed)
    rng = np.random.default_rng(seed)
    params = [draw_augmentation(NUM_REGIONS, crop_size, rng) for _ in range(b)]
    batch.update({k: torch.from_numpy(np.stack([p[k] for p in params])) for k in AUGMENT_KEYS})
    return batch


def step(model: DiPro, batch: dict):
    out = model(batch)
    loss, terms = model.compute_loss(batch, out)
    return loss, terms


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(reference: torch.nn.Module, other: torch.nn.Module, rtol: float, atol: float,
                          min_params: int = 0) -> None:
    """Both models hold gradients for the same (more than ``min_params``) parameters, and close ones."""
    gr, go = grads(reference), grads(other)
    assert gr.keys() == go.keys() and len(gr) > min_params
    for n in gr:
        assert torch.allclose(go[n], gr[n], rtol=rtol, atol=atol), n


# ----------------------------------------------------------------------------- auto switches

def test_auto_switches_resolve_on_for_cuda_off_on_cpu():
    from dipro.train.compile import compile_enabled

    assert resolve_auto("auto", "cuda") is True
    assert resolve_auto("auto", "cpu") is False
    assert resolve_auto(True, "cpu") is True and resolve_auto(False, "cuda") is False
    cfg = load_config(None, [])
    assert cfg.model.compile == "auto" and cfg.model.channels_last == "auto" and cfg.trainer.precision == "bf16"
    assert compile_enabled(cfg, torch.device("cuda", 0)) and not compile_enabled(cfg, torch.device("cpu"))
    off = load_config(None, ["model.compile=false"])
    assert not compile_enabled(off, torch.device("cuda", 0))
    zero3 = ["trainer.strategy=deepspeed", "trainer.zero_stage=3"]
    assert not compile_enabled(load_config(None, zero3), torch.device("cuda", 0))
    assert compile_enabled(load_config(None, ["trainer.strategy=deepspeed"]), torch.device("cuda", 0))  # ZeRO-2
    with pytest.raises(ConfigError, match="zero_stage=3"):
        load_config(None, [*zero3, "model.compile=true"])
    # on this CPU-only process the default model is not channels-last
    assert DiPro(small_cfg(), "mortality", uniform_label_stats()).region_encoder.channels_last is False
    for bad in ("model.compile=maybe", "model.channels_last=1", "model.compile_backend=tvm"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


# ----------------------------------------------------------------------------- one graph

def test_masked_mean_without_host_sync_by_hand():
    v = torch.tensor([1.0, 2.0, 4.0])
    assert masked_mean(v, torch.tensor([True, False, True])).item() == pytest.approx(2.5)
    empty = masked_mean(v.requires_grad_(), torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0
    empty.backward()
    assert v.grad.abs().sum() == 0


@pytest.mark.parametrize("task", ["mortality", "disease_progression"])
def test_training_step_traces_as_one_graph(task):
    """Dynamo alone (backend eager, cheap): fullgraph=True fails on any graph break, and a host sync
    such as bool(t.any()) or t.item() is one; batches of two shapes (CXRs, EHR hours) both trace."""
    from dipro.train.compile import configure_dynamo

    configure_dynamo()
    torch._dynamo.reset()
    model = make_model(task)
    fn = torch.compile(lambda b: step(model, b), backend="eager", fullgraph=True)
    for seed, (cxrs, hours) in enumerate([([3, 2], [5, 7]), ([4, 2, 3], [9, 0, 4])]):
        loss, _ = fn(train_batch(task, cxrs, hours, seed=seed))
        loss.backward()
        assert torch.isfinite(loss)


@pytest.mark.slow
@pytest.mark.parametrize("task,checkpointing", [("disease_progression", True)])
def test_compiled_training_step_gives_eager_loss_and_gradients(task, checkpointing):
    """aot_eager traces forward and backward as inductor would (data-dependent row counts, BatchNorm,
    activation checkpointing inside the graph): the compiled step gives the eager loss and gradients.
    One batch shape (a second one recompiles: traced with dynamo alone in
    test_training_step_traces_as_one_graph); mortality's step: inductor below."""
    from dipro.train.compile import configure_dynamo

    configure_dynamo()
    torch._dynamo.reset()
    eager = make_model(task)
    compiled = make_model(task, activation_checkpointing=checkpointing)
    compiled.load_state_dict(eager.state_dict())
    fn = torch.compile(lambda b: step(compiled, b), backend="aot_eager", fullgraph=True)
    for seed, (cxrs, hours) in enumerate([([4, 2, 3], [9, 0, 4])]):
        batch = train_batch(task, cxrs, hours, seed=seed)
        loss_e, terms_e = step(eager, batch)
        loss_c, terms_c = fn(batch)
        assert torch.allclose(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        for k in terms_e:
            assert torch.allclose(terms_c[k], terms_e[k], rtol=1e-5, atol=1e-6), k
        loss_e.backward()
        loss_c.backward()
        assert_same_gradients(eager, compiled, rtol=1e-4, atol=1e-6, min_params=10)
        eager.zero_grad(set_to_none=True)
        compiled.zero_grad(set_to_none=True)


def test_value_checks_run_only_for_host_tensors_outside_compilation():
    from dipro.model.dipro import _check_values

    assert _check_values(torch.zeros(1))
    assert not _check_values(torch.zeros(1, device="meta"))  # any accelerator: the loader checked the values


# ----------------------------------------------------------------------------- activation checkpointing

@pytest.mark.parametrize("backbone", ["tiny", "resnet18"])
def test_activation_checkpointing_gives_the_same_loss_gradients_and_running_stats(backbone):
    plain = make_model(backbone=backbone, seed=3)
    ckpt = make_model(backbone=backbone, seed=3, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.region_encoder.activation_checkpointing and set(ckpt.state_dict()) == set(plain.state_dict())
    batch = train_batch("mortality", [3, 2], [5, 6], seed=1)
    loss_p, _ = step(plain, batch)
    loss_c, _ = step(ckpt, batch)
    assert torch.allclose(loss_c, loss_p, rtol=1e-6, atol=1e-7)
    loss_p.backward()
    loss_c.backward()
    assert_same_gradients(plain, ckpt, rtol=1e-5, atol=1e-7)
    # the recomputation in backward must not update BatchNorm's running statistics a second time
    sp, sc = plain.state_dict(), ckpt.state_dict()
    for n in sp:
        if "running_" in n or "num_batches_tracked" in n:
            assert torch.equal(sc[n], sp[n]), n
    assert any(not torch.equal(sp[n], make_model(backbone=backbone, seed=3).state_dict()[n])
               for n in sp if "running_mean" in n)  # the forward did update them (once)


def saved_bytes(model) -> int:
    """Bytes of the tensors one training step keeps for its backward pass."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(model, train_batch("mortality", [3, 3], [4, 4], seed=2))
    return total


def test_activation_checkpointing_keeps_fewer_activations():
    """Tensors saved for backward by the backbone: with checkpointing only the stage inputs; with
    model.encoder_chunk as well only each chunk's input and pooled output."""
    plain = saved_bytes(make_model(backbone="resnet18"))
    ckpt = saved_bytes(make_model(backbone="resnet18", activation_checkpointing=True))
    chunked = saved_bytes(make_model(backbone="resnet18", activation_checkpointing=True, encoder_chunk=8))
    assert ckpt < 0.5 * plain
    assert chunked < 0.5 * ckpt


@pytest.mark.parametrize("backbone", ["tiny", "resnet18"])
def test_encoder_chunks_change_nothing_in_evaluation(backbone):
    whole = make_model(backbone=backbone, seed=4).eval()
    chunked = make_model(backbone=backbone, seed=4, encoder_chunk=7).eval()  # 50 crops: 7 x 7 + 1 -> last chunk 2
    chunked.load_state_dict(whole.state_dict())
    batch = train_batch("mortality", [3, 2], [5, 6], seed=5)
    with torch.no_grad():
        a, b = whole(batch), chunked(batch)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.allclose(b[k], a[k], rtol=1e-5, atol=1e-6), k


def test_checkpointed_encoder_chunks_give_the_chunked_loss_gradients_and_running_stats():
    """Checkpointing each chunk recomputes it exactly (same loss and gradients as the chunked
    encoder without checkpointing) and updates BatchNorm's running statistics once per chunk,
    not again in the backward pass; under torch.compile the chunk loop runs eagerly."""
    from dipro.model.region_encoder import run_in_chunks

    def chunk_calls(model):
        calls = []
        model.region_encoder.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        return calls

    plain = make_model(backbone="tiny", seed=6, encoder_chunk=16)
    ckpt = make_model(backbone="tiny", seed=6, encoder_chunk=16, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    calls = chunk_calls(plain)
    batch = train_batch("mortality", [3, 2], [5, 6], seed=7)  # 5 CXRs x 10 regions = 50 crops
    loss_p, _ = step(plain, batch)
    loss_c, _ = step(ckpt, batch)
    assert calls == [16, 16, 16, 2]
    assert torch.allclose(loss_c, loss_p, rtol=1e-6, atol=1e-7)
    loss_p.backward()
    loss_c.backward()
    assert_same_gradients(plain, ckpt, rtol=1e-5, atol=1e-7, min_params=10)
    sp, sc = plain.state_dict(), ckpt.state_dict()
    tracked = [n for n in sp if n.startswith("region_encoder.backbone") and n.endswith("num_batches_tracked")]
    assert tracked and all(int(sp[n]) == 4 and int(sc[n]) == 4 for n in tracked)  # once per chunk
    for n in sp:
        if "running_" in n:
            assert torch.equal(sc[n], sp[n]), n
    # a remainder of one crop joins the chunk before it (BatchNorm needs more than one sample)
    backbone = make_model(backbone="tiny").region_encoder.backbone
    sizes = []
    backbone.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    out = run_in_chunks(backbone, torch.rand(9, 1, 32, 32), 4, checkpointing=False)
    assert sizes == [4, 5] and out.shape == (9, 64)
    # compiled (dynamo, eager backend): the chunk loop is the one graph break, the step still runs
    from dipro.train.compile import configure_dynamo

    configure_dynamo()
    torch._dynamo.reset()
    compiled = make_model(backbone="tiny", seed=6, encoder_chunk=16, activation_checkpointing=True)
    compiled.load_state_dict(plain.state_dict())
    loss_k, _ = torch.compile(lambda b: step(compiled, b), backend="eager")(batch)
    loss_k.backward()
    assert torch.allclose(loss_k, loss_p, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- optimizer

def test_adamw_is_fused_on_cuda_and_foreach_elsewhere():
    from dipro.train.optim import adamw_implementation, build_optimizer

    cuda = [SimpleNamespace(device=torch.device("cuda", 0))] * 2
    assert adamw_implementation(cuda) == {"fused": True}
    assert adamw_implementation(cuda, offload=True) == {"foreach": True}
    assert adamw_implementation([torch.zeros(1)]) == {"foreach": True}
    cfg = load_config(None, [])
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


# ----------------------------------------------------------------------------- ranks sharing a GPU

def test_fractional_gpus_use_gloo_and_reach_ray_resources():
    from dipro.train.placement import worker_resources

    shared = load_config(None, ["trainer.use_gpu=true", "trainer.gpus_per_worker=0.5", "trainer.num_workers=2"])
    assert shared.trainer.shares_gpu and shared.trainer.dist_backend == "gloo"
    assert worker_resources(shared) == {"CPU": 1.0, "GPU": 0.5}
    whole = load_config(None, ["trainer.use_gpu=true"])
    assert whole.trainer.dist_backend == "nccl" and worker_resources(whole)["GPU"] == 1.0
    assert load_config(None, ["trainer.gpus_per_worker=2"]).trainer.gpus_per_worker == 2.0
    assert load_config(None, []).trainer.dist_backend == "gloo"  # CPU
    with pytest.raises(ConfigError, match="needs trainer.strategy=ddp"):
        load_config(None, ["trainer.use_gpu=true", "trainer.gpus_per_worker=0.5", "trainer.strategy=deepspeed"])
    for bad in ("0", "1.5", "-1"):
        with pytest.raises(ConfigError, match="gpus_per_worker"):
            load_config(None, [f"trainer.gpus_per_worker={bad}"])


@pytest.mark.slow
def test_inductor_compiles_the_step_with_data_dependent_crop_counts():
    """inductor (the GPU default backend; here its CPU code generation, ~100 s on 2 cores) on the
    tiny model: the loss and gradients of the eager step.  Without dipro.train.compile's settings this
    fails at run time (a convolution whose batch size is data-dependent gets mispredicted strides).

    The CPU kernels are generated scalar (``cpp.simdlen=1``): what is tested is the graph's lowering and
    layout (a GPU generates Triton, not vectorised C++), and scalar kernels cut the compile from ~135 s
    to ~98 s (2026-12-03); without ``layout_optimization=False`` it still fails the same way (checked
    the same day: "expected size 16==16, stride 1==256 at dim=1")."""
    import torch._inductor.config

    from dipro.train.compile import configure_dynamo

    configure_dynamo()
    torch._dynamo.reset()
    eager = make_model("mortality")
    compiled = make_model("mortality")
    compiled.load_state_dict(eager.state_dict())
    with torch._inductor.config.patch({"cpp.simdlen": 1}):
        fn = torch.compile(lambda b: step(compiled, b), backend="inductor", fullgraph=True)
        batch = train_batch("mortality", [3, 2], [5, 7], seed=0)
        loss_c, _ = fn(batch)
        loss_e, _ = step(eager, batch)
        assert torch.allclose(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        loss_c.backward()
    loss_e.backward()
    assert_same_gradients(eager, compiled, rtol=1e-3, atol=1e-5)
