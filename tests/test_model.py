"""DiPro end to end on in-memory batches: shapes, masks, reversal, gradients, ablations, weights, state dict."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from helpers import config_path, make_model, small_cfg

from dipro.config import Config, LossConfig, ModelConfig, load_config
from data_sharding.errors import ConfigError, DataError
from dipro.model import DiPro, build_model
from dipro.model.region_encoder import RegionEncoder, build_backbone
from dipro.model.synthetic import concat_batches, random_batch, uniform_label_stats

TASKS = ("disease_progression", "mortality", "length_of_stay")
LOGIT_SHAPES = {"disease_progression": (7, 3), "mortality": (), "length_of_stay": (4,)}


def outputs_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    for key in ("logits", "region_attention"):
        assert torch.allclose(a[key], b[key], atol=atol), key


@pytest.mark.parametrize("task", TASKS)
def test_shapes_and_finite_for_2_to_14_cxrs_and_0_to_200_ehr_hours(task):
    model = make_model(task).eval()
    cases = [([2, 2, 2], [0, 1, 200])] if task == "disease_progression" else [([2, 14, 5], [0, 49, 200]), ([14, 3], [200, 0])]
    for num_cxrs, steps in cases:
        batch = random_batch(task, len(num_cxrs), num_cxrs, steps, seed=1)
        with torch.no_grad():
            out = model(batch)
            loss, terms = model.compute_loss(batch, out)
        b, p = len(num_cxrs), max(num_cxrs) - 1
        assert out["logits"].shape == (b, *LOGIT_SHAPES[task])
        assert out["region_attention"].shape == (b, 10)
        assert torch.allclose(out["region_attention"].sum(1), torch.ones(b), atol=1e-5)
        assert out["S"].shape == out["D"].shape == out["S_rev"].shape == (b, p, 10, 32)
        assert out["region_logits"].shape == (b, p, 10, 7, 3)
        for name, value in [*out.items(), *terms.items()]:
            assert torch.isfinite(value.float()).all(), name
        probs = model.predict_proba(out)
        assert probs.shape == out["logits"].shape
        if task != "mortality":
            assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)


def _garbage_padding(batch: dict, real_t: int, real_l: int) -> dict:
    """Fill padded CXR / EHR slots with values that would matter if they leaked (EHR hours inside the intervals)."""
    g = torch.Generator().manual_seed(7)
    batch["crops"][:, real_t:] = torch.randint(0, 256, batch["crops"][:, real_t:].shape, generator=g, dtype=torch.uint8)
    batch["region_mask"][:, real_t:] = True
    batch["cxr_hours"][:, real_t:] = 5.0
    batch["ehr_values"][:, real_l:] = 100.0
    batch["ehr_obs_mask"][:, real_l:] = 1.0
    lo, hi = float(batch["cxr_hours"][0, 0]), float(batch["cxr_hours"][0, real_t - 1])
    batch["ehr_hours"][:, real_l:] = torch.linspace(lo, hi, batch["ehr_hours"].shape[1] - real_l)
    batch["region_labels"][:, real_t - 1 :] = 0
    return batch


@pytest.mark.parametrize("task", TASKS)
def test_padded_cxrs_and_ehr_steps_change_nothing(task):
    model = make_model(task).eval()
    t = 2 if task == "disease_progression" else 4
    plain = random_batch(task, 1, t, 20, seed=3)
    padded = _garbage_padding(random_batch(task, 1, t, 20, seed=3, pad_cxrs_to=t + 3, pad_ehr_to=57), t, 20)
    assert torch.equal(plain["crops"], padded["crops"][:, :t])
    with torch.no_grad():
        a, b = model(plain), model(padded)
        _, terms_a = model.compute_loss(plain, a)
        _, terms_b = model.compute_loss(padded, b)
    outputs_close(a, b)
    for key in ("S", "D", "S_rev", "D_rev", "region_logits"):
        assert torch.allclose(a[key], b[key][:, : t - 1], atol=1e-5), key
    for key, value in terms_a.items():
        assert value.item() == pytest.approx(terms_b[key].item(), rel=1e-4, abs=1e-6), key


def test_padding_next_to_a_longer_sample_changes_nothing():
    model = make_model("mortality").eval()
    alone = random_batch("mortality", 1, 3, 10, seed=5)
    together = concat_batches([alone, random_batch("mortality", 1, 9, 49, seed=6)])  # sample 0 padded to T=9, L=49
    assert together["crops"].shape[1] == 9 and together["ehr_mask"].shape[1] == 49
    with torch.no_grad():
        a, b = model(alone), model(together)
    assert torch.allclose(a["logits"], b["logits"][:1], atol=1e-5)
    assert torch.allclose(a["region_attention"], b["region_attention"][:1], atol=1e-5)


def test_swapping_the_pair_swaps_static_and_dynamic_roles_exactly():
    # the paper's reversed pair [F_t+1 || F_t] (model.pair_reversal=swap); the authors' interleaved layout
    # (the default) is another input to f_s / f_d, so there the roles do not swap exactly
    model = make_model("disease_progression", pair_reversal="swap").eval()
    batch = random_batch("disease_progression", 3, 2, 12, seed=4)
    swapped = dict(batch)
    for key in ("crops", "region_mask"):
        swapped[key] = batch[key].flip(1)
    swapped["region_labels"] = torch.tensor([1, 0, 2, 3])[batch["region_labels"]]
    with torch.no_grad():
        out, out_sw = model(batch), model(swapped)
        _, terms = model.compute_loss(batch, out)
        _, terms_sw = model.compute_loss(swapped, out_sw)
    for fwd, rev in (("S", "S_rev"), ("D", "D_rev"), ("region_logits", "region_logits_rev")):
        assert torch.allclose(out_sw[fwd], out[rev], atol=1e-6), fwd
        assert torch.allclose(out_sw[rev], out[fwd], atol=1e-6), rev
    # L_PAE is symmetric under (swap the pair, reverse the labels)
    assert terms_sw["pae_ce"].item() == pytest.approx(terms["pae_ce"].item(), rel=1e-5)
    assert terms_sw["static"].item() == pytest.approx(terms["static"].item(), rel=1e-5)


@pytest.mark.parametrize("task", TASKS)
def test_gradients_reach_every_trainable_parameter(task):
    model = make_model(task).train()
    # sample 1 has no EHR, some regions are missing (black crops)
    batch = random_batch(task, 2, [2, 2] if task == "disease_progression" else [3, 4], [30, 0], seed=2, missing_region_prob=0.3)
    if task == "disease_progression":
        batch["progression"] = torch.tensor([[0, 1, 2, 0, 1, 2, 0], [1, 2, 0, 1, 2, 0, 1]])  # every disease labelled
    out = model(batch)
    loss, _ = model.compute_loss(batch, out)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


ABLATIONS = [
    dict(use_ehr=False),
    dict(last_cxr_only=True),
    dict(use_pae=False),
    dict(use_std_losses=False),
    dict(local_fusion=False),
    dict(global_fusion=False),
    dict(local_fusion=False, global_fusion=False),
    dict(use_ehr=False, use_pae=False, last_cxr_only=True),
]


@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_every_ablation_runs_and_uses_all_its_parameters(ablation):
    model = make_model("mortality", **ablation).train()
    batch = random_batch("mortality", 2, [4, 3], [49, 0], seed=6, missing_region_prob=0.3)
    if not ablation.get("use_ehr", True):
        for key in ("ehr_values", "ehr_obs_mask", "ehr_hours", "ehr_mask"):
            batch.pop(key)
    out = model(batch)
    loss, terms = model.compute_loss(batch, out)
    assert torch.isfinite(loss)
    if not ablation.get("use_pae", True):
        assert terms["pae_ce"].item() == terms["static"].item() == 0.0
        assert "region_logits" not in out
    if not ablation.get("use_std_losses", True):
        assert terms["orth"].item() == terms["temp"].item() == 0.0
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters unused under {ablation}: {unused}"


def test_last_cxr_only_equals_feeding_the_last_two_cxrs():
    model = make_model("length_of_stay", last_cxr_only=True).eval()
    full = random_batch("length_of_stay", 2, [5, 3], 49, seed=8)
    last = dict(full)
    rows = []
    for i, n in enumerate([5, 3]):
        rows.append({k: full[k][i, n - 2 : n] for k in ("crops", "region_mask", "cxr_mask", "cxr_hours")})
    for k in ("crops", "region_mask", "cxr_mask", "cxr_hours"):
        last[k] = torch.stack([r[k] for r in rows])
    last["region_labels"] = torch.stack([full["region_labels"][0, 3:4], full["region_labels"][1, 1:2]])
    with torch.no_grad():
        a, b = model(full), model(last)
        _, ta = model.compute_loss(full, a)
        _, tb = model.compute_loss(last, b)
    outputs_close(a, b)
    assert ta["pae_ce"].item() == pytest.approx(tb["pae_ce"].item(), rel=1e-5)


def test_bad_batches_are_data_errors_naming_the_sample():
    model = make_model("mortality").eval()
    batch = random_batch("mortality", 2, [3, 3], 5, seed=0)
    batch["cxr_mask"][1, 1:] = False
    with pytest.raises(DataError, match="s1_0"):
        model(batch)
    batch = random_batch("mortality", 1, 3, 5, crop_size=64)
    with pytest.raises(DataError, match="crop_size"):
        model(batch)
    batch = random_batch("length_of_stay", 1, 3, 5)
    batch["region_labels"][0, 0, 0, 0] = 7
    out = model(batch)
    with pytest.raises(DataError, match="region_labels"):
        model.compute_loss(batch, out)
    del batch["ehr_mask"]
    with pytest.raises(DataError, match="ehr_mask"):
        model(batch)


def test_state_dict_alone_rebuilds_class_weights_and_outputs():
    cfg = Config(task="disease_progression", model=small_cfg())
    stats = uniform_label_stats()
    stats["disease_progression"]["task"] = [[5, 40, 100, 3]] * 7
    model = build_model(cfg, stats).eval()
    rebuilt = build_model(cfg, None, load_pretrained=False).eval()
    assert not torch.equal(rebuilt.class_weights.progression, model.class_weights.progression)
    rebuilt.load_state_dict(model.state_dict())
    batch = random_batch("disease_progression", 2, 2, 10, seed=9)
    with torch.no_grad():
        a, b = model(batch), rebuilt(batch)
        assert torch.equal(model.compute_loss(batch, a)[0], rebuilt.compute_loss(batch, b)[0])
    assert torch.equal(a["logits"], b["logits"])


def test_backbone_weights_load_from_a_local_file(tmp_path, caplog):
    import torchvision

    rgb = torchvision.models.resnet18(weights=None).state_dict()  # 3-channel stem + fc, like ImageNet files
    path = tmp_path / "resnet18.pt"
    torch.save(rgb, path)
    enc = RegionEncoder("resnet18", 16, 0.0, weights_path=str(path))
    assert torch.allclose(enc.backbone.conv1.weight, rgb["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(enc.backbone.layer1[0].conv1.weight, rgb["layer1.0.conv1.weight"])
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in rgb.items()}}, wrapped)
    unwrapped = RegionEncoder("resnet18", 16, 0.0, weights_path=str(wrapped))  # "state_dict" and "module." peeled
    assert torch.allclose(unwrapped.backbone.conv1.weight, rgb["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(unwrapped.backbone.layer4[1].conv2.weight, rgb["layer4.1.conv2.weight"])

    with caplog.at_level(logging.WARNING, logger="dipro.model.region_encoder"):
        RegionEncoder("tiny", 16, 0.0)
    assert "random initialisation" in caplog.text


def test_bad_backbone_weight_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(DataError, match="nope.pt"):
        RegionEncoder("tiny", 16, 0.0, weights_path=str(missing))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(DataError, match="garbage.pt"):
        RegionEncoder("tiny", 16, 0.0, weights_path=str(garbage))
    other = tmp_path / "resnet18_for_tiny.pt"
    torch.save(build_backbone("resnet18")[0].state_dict(), other)
    with pytest.raises(DataError, match="resnet18_for_tiny.pt.*missing keys"):
        RegionEncoder("tiny", 16, 0.0, weights_path=str(other))


def test_channels_last_gives_the_same_features():
    torch.manual_seed(0)
    a = RegionEncoder("tiny", 16, 0.0).eval()
    b = RegionEncoder("tiny", 16, 0.0, channels_last=True).eval()
    b.load_state_dict(a.state_dict())
    batch = random_batch("mortality", 2, 3, 1)
    args = (batch["crops"], batch["region_mask"], batch["cxr_mask"])
    with torch.no_grad():
        assert torch.allclose(a(*args), b(*args), atol=1e-5)


def test_task_configs_build_models():
    # the authors' effective rates: accumulation 4 x 1 GPU x batch x base_lr (main.py --scale_lr)
    expected_lr = {"disease_progression": 4 * 8 * 5e-6, "mortality": 4 * 4 * 1e-5, "length_of_stay": 4 * 4 * 8e-6}
    for name in ("disease_progression", "mortality", "length_of_stay"):
        cfg = load_config(config_path(name))
        assert cfg.task == name and cfg.model.backbone == "resnet50" and cfg.optim.grad_accum == 4
        assert cfg.model.backbone_weights == "imagenet"
        assert cfg.model.input_scaling == "unit" and cfg.optim.schedule_interval == "epoch"
        assert cfg.effective_lr == pytest.approx(expected_lr[name])
    demo = load_config(config_path("demo"))
    assert demo.model.backbone_weights is None  # never downloads
    model = build_model(demo, uniform_label_stats())
    batch = random_batch(demo.task, 2, [2, 4], [49, 49], crop_size=demo.model.crop_size)
    loss, _ = model.compute_loss(batch, model(batch))
    assert torch.isfinite(loss)


def test_reversed_static_feature_gets_no_gradient_from_the_static_term():
    model = make_model("mortality").train()
    batch = random_batch("mortality", 2, [3, 4], [20, 30], seed=4)
    out = model(batch)
    _, terms = model.compute_loss(batch, out)
    g_s, g_rev = torch.autograd.grad(terms["static"], [out["S"], out["S_rev"]], allow_unused=True)
    assert g_s is not None and g_s.abs().sum() > 0
    assert g_rev is None  # mse(S, S~.detach()): S~ is a target


def test_missing_regions_are_encoded_as_black_crops_and_padded_cxrs_as_zeros():
    torch.manual_seed(0)
    enc = RegionEncoder("tiny", 16, 0.0).eval()
    batch = random_batch("mortality", 2, [2, 3], 1, seed=1, missing_region_prob=0.4)
    crops, regions, cxrs = batch["crops"], batch["region_mask"], batch["cxr_mask"]
    assert (~regions[cxrs]).any()
    with torch.no_grad():
        feats = enc(crops, regions, cxrs)
        black = enc.proj(enc.backbone(torch.zeros(1, 1, 32, 32)))[0]  # what a black crop becomes
    missing = (~regions) & cxrs[:, :, None]
    assert torch.allclose(feats[missing], black.expand(int(missing.sum()), -1), atol=1e-5)
    assert feats[0, 2].abs().sum() == 0  # the padded third CXR of sample 0
    # augmentation jitters real crops but keeps a missing region black
    params = (torch.full((2, 3, 10), 1.1), torch.full((2, 3, 10), 9.0), torch.zeros(2, 3, 10, 2, dtype=torch.long))
    with torch.no_grad():
        jittered = enc(crops, regions, cxrs, params)
    assert torch.allclose(jittered[missing], feats[missing], atol=1e-5)
    assert not torch.allclose(jittered[regions & cxrs[:, :, None]], feats[regions & cxrs[:, :, None]], atol=1e-6)


def test_padding_changes_nothing_in_training_mode_either():
    # BatchNorm statistics (region adapter, f_s, f_d) come from real crops and pairs only
    model = make_model("mortality", dropout=0.0).train()
    plain = random_batch("mortality", 2, [3, 4], [20, 30], seed=3)
    padded = random_batch("mortality", 2, [3, 4], [20, 30], seed=3, pad_cxrs_to=7, pad_ehr_to=60)
    padded["crops"][:, 4:] = 200
    padded["ehr_values"][:, 30:] = 50.0
    with torch.no_grad():
        a, b = model(plain), model(padded)
        terms_a, terms_b = model.compute_loss(plain, a)[1], model.compute_loss(padded, b)[1]
    outputs_close(a, b)
    for key, value in terms_a.items():
        assert value.item() == pytest.approx(terms_b[key].item(), rel=1e-4, abs=1e-6), key


def test_region_attention_is_the_final_fusion_attention_on_region_tokens():
    model = make_model("mortality").eval()
    batch = random_batch("mortality", 2, [3, 2], [20, 10], seed=2)
    seen = []
    model.mmf.fusion.register_forward_hook(lambda mod, inp, out: seen.append(out[1]))
    with torch.no_grad():
        out = model(batch)
    w = seen[0]  # [B, 1 + P*R + L, same]: task token first, then the P x R region tokens pair by pair
    p = 2
    for i, n_pairs in enumerate([2, 1]):
        on_regions = w[i, 0, 1 : 1 + p * 10].reshape(p, 10)
        assert on_regions[n_pairs:].abs().sum() == 0  # padded pair: masked
        expected = on_regions.sum(0) / on_regions.sum()
        assert torch.allclose(out["region_attention"][i], expected, atol=1e-6)


def test_one_channel_stem_on_gray_equals_the_rgb_network_on_replicated_gray(tmp_path):
    import torchvision

    torch.manual_seed(0)
    rgb = torchvision.models.resnet18(weights=None).eval()
    rgb.fc = torch.nn.Identity()
    path = tmp_path / "resnet18.pt"
    torch.save(rgb.state_dict(), path)
    enc = RegionEncoder("resnet18", 16, 0.0, weights_path=str(path)).eval()  # input_scaling unit
    crops = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    x = enc.normalise(crops)
    assert torch.equal(x[:, 0], crops.float() / 255)  # the authors' ToTensor: [0, 1], no mean/std
    with torch.no_grad():
        ours = enc.backbone(x)
        theirs = rgb(x.expand(-1, 3, -1, -1))  # Image.convert('RGB'): the gray image in every channel
    assert torch.allclose(ours, theirs, atol=1e-4)
    imagenet = RegionEncoder("tiny", 16, 0.0, input_scaling="imagenet")
    from dipro.model.region_encoder import GRAY_MEAN, GRAY_STD

    assert torch.allclose(imagenet.normalise(crops)[:, 0], (crops.float() / 255 - GRAY_MEAN) / GRAY_STD)


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch):
    import torchvision
    from dipro.model import region_encoder as re

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    url, path = re.imagenet_weights_file("resnet50")
    assert url == torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    # a locally generated resnet18 state dict placed where torchvision's weights API keeps IMAGENET1K_V1
    _, cached = re.imagenet_weights_file("resnet18")
    cached.parent.mkdir(parents=True)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, cached)
    enc = RegionEncoder("resnet18", 16, 0.0, weights_path="imagenet")
    assert torch.allclose(enc.backbone.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(enc.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    # a checkpoint rebuild never touches the cache
    cached.unlink()
    RegionEncoder("resnet18", 16, 0.0, weights_path="imagenet", load_pretrained=False)


def test_imagenet_weights_offline_is_one_line_saying_where_the_file_goes(tmp_path, monkeypatch):
    import urllib.error

    from data_sharding.errors import UserError
    from dipro.model import region_encoder as re

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as err:
        RegionEncoder("resnet50", 16, 0.0, weights_path="imagenet")
    msg = str(err.value)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert "\n" not in msg and "resnet50-0676ba61.pth" in msg and str(cache) in msg
    assert "model.backbone_weights=/path/to/resnet50-0676ba61.pth" in msg and "Name or service not known" in msg
    with pytest.raises(ConfigError, match="imagenet"):
        ModelConfig(backbone="tiny", backbone_weights="imagenet")


def _planted_batch(task: str, n: int, seed: int) -> tuple[dict, torch.Tensor]:
    """Labels carried by the images: mortality = brighter last CXR; progression = brightness change between CXRs."""
    batch = random_batch(task, n, 3 if task == "mortality" else 2, 12, seed=seed, missing_region_prob=0.0)
    g = torch.Generator().manual_seed(seed + 100)
    crops = torch.randint(60, 120, batch["crops"].shape, generator=g).float()
    if task == "mortality":
        y = torch.randint(0, 2, (n,), generator=g)
        crops[:, -1] += 100.0 * y.view(-1, 1, 1, 1)
        batch["mortality"] = y.float()
    else:
        y = torch.randint(0, 3, (n,), generator=g)  # 0 worsened (brighter), 1 improved (darker), 2 no change
        delta = torch.tensor([80.0, -50.0, 0.0])[y]
        crops[:, 1] += delta.view(-1, 1, 1, 1)
        batch["progression"] = y.view(-1, 1).expand(-1, 7).clone()
        batch["region_labels"][:, 0] = y.view(-1, 1, 1)
    batch["crops"] = crops.clamp(0, 255).to(torch.uint8)
    return batch, y


def _train_and_score(task: str, shuffle: bool) -> float:
    from dipro.metrics import compute_metrics

    torch.manual_seed(0)
    model = DiPro(small_cfg(dropout=0.0), task, uniform_label_stats(), LossConfig())
    train, y = _planted_batch(task, 96, seed=11)
    if shuffle:
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
        for key in ("mortality", "progression", "region_labels"):
            if key in train:
                train[key] = train[key][perm]
    test, y_test = _planted_batch(task, 64, seed=12)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # decayed to 0 as training runs do (optim.min_lr): BatchNorm's running statistics, which evaluation
    # uses, then settle on the final weights instead of lagging weights that still move fast
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    model.train()
    for step in range(40):
        idx = torch.arange(step * 16, step * 16 + 16) % len(y)
        mb = {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in train.items()}
        loss, _ = model.compute_loss(mb, model(mb))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        probs = model.predict_proba(model(test))
    if task == "mortality":
        # minus the Brier score: AUROC cannot tell the control from a learner here, because any output
        # that follows the planted brightness ranks deaths perfectly or exactly backwards, whatever
        # labels it was fitted to; only a model that learned the labels predicts calibrated risks
        return -float(((probs - y_test.float()) ** 2).mean())
    return compute_metrics(task, y_test.view(-1, 1).expand(-1, 7), probs)["auroc"]


# (the score the true-label model must reach, its margin over the shuffled-label control)
PLANTED = {"mortality": (-0.15, 0.15), "disease_progression": (0.9, 0.2)}


@pytest.mark.slow
@pytest.mark.parametrize("task", ["mortality", "disease_progression"])
def test_learns_a_planted_signal_and_not_shuffled_labels(task):
    real = _train_and_score(task, shuffle=False)
    control = _train_and_score(task, shuffle=True)
    least, margin = PLANTED[task]
    assert real > least, real
    assert real - control > margin, (real, control)


def test_config_dataclass_has_the_ablation_keys():
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert {"use_ehr", "last_cxr_only", "use_pae", "use_std_losses", "local_fusion", "global_fusion"} <= names


@pytest.mark.parametrize("task", TASKS)
def test_bf16_autocast_forward_backward_is_finite(task):
    model = make_model(task).train()
    batch = random_batch(task, 2, [2, 2] if task == "disease_progression" else [3, 5], [20, 0], seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        loss, terms = model.compute_loss(batch, out)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
