"""Each DiPro loss, the class weights and the interval attention mask against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data_sharding.constants import reverse_progression_label
from dipro.config import LossConfig
from data_sharding.errors import DataError
from dipro.model.layers import EncoderLayerWithWeights, MultiHeadAttention, index_positional_encoding, masked_softmax
from dipro.model.losses import ClassWeights, balanced_class_weights, los_ce, masked_class_weighted_ce, mortality_bce, total_loss
from dipro.model.mmf import IntervalEHREncoder, RegionAwareAttention, interval_attention_bias
from dipro.model.pae import pae_progression_loss, reverse_labels, static_consistency_loss
from dipro.model.std import (SpatiotemporalDisentanglement, adjacent_pairs, orthogonality_loss, pair_validity,
                             temporal_consistency_loss)

INF = float("inf")


def test_pair_validity_needs_both_cxrs_real():
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    assert pair_validity(mask).tolist() == [[True, True, False], [True, False, False]]


def test_adjacent_pairs_forward_and_reversed():
    f = torch.arange(3.0).view(1, 3, 1, 1)  # F_t = t
    assert adjacent_pairs(f).flatten().tolist() == [0, 1, 1, 2]
    assert adjacent_pairs(f, reverse=True).flatten().tolist() == [1, 0, 2, 1]


def test_authors_interleaved_reversal_by_hand():
    # F_0 = (1, 2), F_1 = (3, 4): swap -> (3, 4, 1, 2); the authors' code -> (3, 1, 4, 2)
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)
    assert adjacent_pairs(f, reverse=True).flatten().tolist() == [3, 4, 1, 2]
    assert adjacent_pairs(f, reverse=True, interleave=True).flatten().tolist() == [3, 1, 4, 2]
    assert adjacent_pairs(f, interleave=True).flatten().tolist() == [1, 2, 3, 4]  # forward pairs are never interleaved


def test_batchnorm_projections_see_only_valid_pairs():
    torch.manual_seed(0)
    std = SpatiotemporalDisentanglement(4, 0.0).train()
    feats = torch.randn(2, 3, 10, 4)
    valid = torch.tensor([[True, True], [True, False]])
    s, d = std(feats, valid)
    assert s.shape == d.shape == (2, 2, 10, 4)
    assert torch.count_nonzero(s[1, 1]) == 0 and torch.count_nonzero(d[1, 1]) == 0  # padded pair: zeros
    # BatchNorm in training mode normalises over the 3 valid pairs x 10 regions only: per feature, the
    # pre-norm activations of the valid entries end up with mean 0 and (biased) variance 1
    real = s[valid].reshape(-1, 4)
    assert torch.allclose(real.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(real.var(0, unbiased=False), torch.ones(4), atol=1e-3)
    changed = feats.clone()
    changed[1, 2] = 1e3  # the CXR that only the padded pair uses
    s2, _ = std(changed, valid)
    assert torch.allclose(s2, s, atol=1e-6)


def test_orthogonality_loss_by_hand():
    # sample 0: pair0 cos = 1/sqrt2 (cos^2 0.5), pair1 orthogonal (0), pair2 invalid (cos^2 1, ignored)
    # sample 1: pair0 parallel (1), pairs 1-2 invalid
    s = torch.tensor([[[[1.0, 0]], [[1, 0]], [[1, 0]]], [[[2.0, 0]], [[1, 0]], [[1, 0]]]])
    d = torch.tensor([[[[1.0, 1]], [[0, 1]], [[3, 0]]], [[[5.0, 0]], [[0, 1]], [[0, 1]]]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    # the mean over the batch's 3 valid (pair, region) terms, the authors' torch.mean(cos^2) without padding
    assert orthogonality_loss(s, d, valid).item() == pytest.approx((0.5 + 0.0 + 1.0) / 3)


def test_temporal_consistency_loss_by_hand():
    s = torch.tensor([[[[0.0, 0]], [[1, 1]], [[3, 1]]]])  # [B=1,P=3,R=1,d=2]
    all_valid = torch.tensor([[True, True, True]])
    # ||S1-S0||^2 = 2, ||S2-S1||^2 = 4; N = 2 terms x d=2
    assert temporal_consistency_loss(s, all_valid).item() == pytest.approx(6 / 4)
    last_invalid = torch.tensor([[True, True, False]])
    assert temporal_consistency_loss(s, last_invalid).item() == pytest.approx(2 / 2)
    one_pair = torch.tensor([[True, False, False]])
    assert temporal_consistency_loss(s, one_pair).item() == 0.0
    assert temporal_consistency_loss(s[:, :1], all_valid[:, :1]).item() == 0.0  # P = 1: no term (the authors' P > 1)
    # two samples with 2 and 1 consecutive terms: (2 + 4 + 8) / (3 terms x d=2)
    s2 = torch.cat([s, torch.tensor([[[[0.0, 0]], [[2, 2]], [[0, 0]]]])])
    valid2 = torch.tensor([[True, True, True], [True, True, False]])
    assert temporal_consistency_loss(s2, valid2).item() == pytest.approx(14 / 6)


def test_static_consistency_loss_by_hand():
    s = torch.tensor([[[[1.0, 2.0]], [[9.0, 9.0]]]])
    s_rev = torch.tensor([[[[0.0, 0.0]], [[0.0, 0.0]]]])
    valid = torch.tensor([[True, False]])
    assert static_consistency_loss(s, s_rev, valid).item() == pytest.approx(5 / 2)


def test_static_consistency_stops_the_gradient_at_the_reversed_feature():
    # L = mean over the valid pair's d = 2 entries of (S - S~)^2 = ((1 - 0.5)^2 + (2 - 3)^2) / 2
    s = torch.tensor([[[[1.0, 2.0]], [[9.0, 9.0]]]], requires_grad=True)
    s_rev = torch.tensor([[[[0.5, 3.0]], [[0.0, 0.0]]]], requires_grad=True)
    valid = torch.tensor([[True, False]])
    loss = static_consistency_loss(s, s_rev, valid)  # the authors' mse(S, S~.detach())
    assert loss.item() == pytest.approx((0.25 + 1.0) / 2)
    loss.backward()
    assert s.grad[0, 0, 0].tolist() == pytest.approx([2 * 0.5 / 2, 2 * -1.0 / 2])  # dL/dS = 2 (S - S~) / N
    assert s.grad[0, 1].abs().sum() == 0  # padded pair
    assert s_rev.grad is None  # S~ receives no gradient from the static term


def test_balanced_class_weights_by_hand():
    w = balanced_class_weights([[30, 10, 50, 200]], "x")
    assert w.tolist()[0] == pytest.approx([90 / 90, 90 / 30, 90 / 150])  # n / (3 n_c); label 3 not counted
    with pytest.raises(DataError, match="x"):
        balanced_class_weights([[1, 2]], "x")


STATS = {
    "disease_progression": {"task": [[30, 10, 50, 1]] * 7, "region": [[10, 10, 10, 5]] * 7},
    "mortality_los": {"mortality": [80, 20], "los_bin": [1, 1, 1, 1], "region": [[10, 20, 30, 0]] * 7},
}


def test_paper_class_weights_are_the_authors():
    prog = ClassWeights("disease_progression", STATS)
    assert prog.progression[3].tolist() == pytest.approx([90 / 90, 90 / 30, 90 / 150])  # n / (3 n_c), study level
    assert prog.region[3].tolist() == pytest.approx([1.0, 3.0, 0.6])  # PAE: the same study-level counts
    for task in ("mortality", "length_of_stay"):
        icu = ClassWeights(task, STATS)
        # PAE weights of the ICU tasks also come from the disease_progression study-level training counts,
        # not from their own region labels ([10, 20, 30] would give [2, 1, 2/3])
        assert icu.region[0].tolist() == pytest.approx([1.0, 3.0, 0.6])
    mort = ClassWeights("mortality", STATS)
    assert mort.mortality_pos_weight.item() == pytest.approx(20 / 100)  # n_pos / n: 20 deaths of 100 stays
    assert {"progression", "region", "mortality_pos_weight"} <= set(dict(mort.named_buffers()))
    with pytest.raises(DataError, match="disease_progression.task"):
        ClassWeights("mortality", {"mortality_los": STATS["mortality_los"]})


def test_mortality_bce_with_the_authors_pos_weight_by_hand():
    # 20 deaths in 100 stays: pos_weight 0.2; logits 0 -> each term log 2, the death's scaled by 0.2
    w = ClassWeights("mortality", STATS).mortality_pos_weight
    loss = mortality_bce(torch.zeros(2), torch.tensor([1.0, 0.0]), w)
    assert loss.item() == pytest.approx((0.2 * math.log(2) + math.log(2)) / 2, rel=1e-6)


def test_masked_class_weighted_ce_by_hand():
    logits = torch.tensor([[[0.0, 0, 0]], [[math.log(2), 0, 0]], [[5.0, -5, 0]]])  # [N=3,K=1,3]
    labels = torch.tensor([[0], [1], [3]])  # third sample "not mentioned": ignored
    w = torch.tensor([[1.0, 3.0, 1.0]])
    expected = (1 * math.log(3) + 3 * math.log(4)) / (1 + 3)
    assert masked_class_weighted_ce(logits, labels, w).item() == pytest.approx(expected, rel=1e-6)
    ref = F.cross_entropy(logits[:2, 0], labels[:2, 0], weight=w[0])
    assert masked_class_weighted_ce(logits, labels, w).item() == pytest.approx(ref.item(), rel=1e-6)


def test_masked_ce_sums_over_diseases_and_skips_unlabelled():
    torch.manual_seed(0)
    logits = torch.randn(6, 3, 3)
    labels = torch.tensor([[0, 3, 2], [1, 3, 2], [2, 3, 0], [0, 3, 1], [3, 3, 3], [1, 3, 0]])
    w = torch.rand(3, 3) + 0.5
    expected = sum(
        F.cross_entropy(logits[labels[:, k] != 3, k], labels[labels[:, k] != 3, k], weight=w[k]) for k in (0, 2)
    )
    assert masked_class_weighted_ce(logits, labels, w).item() == pytest.approx(expected.item(), rel=1e-5)
    all_missing = torch.full((6, 3), 3)
    assert masked_class_weighted_ce(logits, all_missing, w).item() == 0.0


def test_reversal_label_map():
    assert reverse_labels(torch.tensor([0, 1, 2, 3])).tolist() == [1, 0, 2, 3]
    assert [reverse_progression_label(x) for x in range(4)] == [1, 0, 2, 3]


def test_pae_progression_loss_by_hand():
    # one pair, one region, one disease; original label worsened (0) -> reversed improved (1)
    logits = torch.tensor([math.log(2), 0.0, 0.0]).view(1, 1, 1, 1, 3)
    logits_rev = torch.zeros(1, 1, 1, 1, 3)
    labels = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    w = torch.tensor([[1.0, 3.0, 1.0]])
    valid = torch.tensor([[True]])
    expected = (1 * math.log(2) + 3 * math.log(3)) / (1 + 3)
    assert pae_progression_loss(logits, logits_rev, labels, valid, w).item() == pytest.approx(expected, rel=1e-6)
    # an invalid pair contributes nothing, whatever its label
    assert pae_progression_loss(logits, logits_rev, labels, torch.tensor([[False]]), w).item() == 0.0


def test_mortality_bce_and_los_ce_by_hand():
    logits = torch.zeros(2)
    y = torch.tensor([1.0, 0.0])
    assert mortality_bce(logits, y, torch.tensor([4.0])).item() == pytest.approx((4 * math.log(2) + math.log(2)) / 2)
    assert los_ce(torch.zeros(3, 4), torch.tensor([0, 1, 3])).item() == pytest.approx(math.log(4))


def test_total_loss_is_the_weighted_sum():
    terms = {k: torch.tensor(v) for k, v in dict(task_ce=1.0, orth=2.0, temp=3.0, static=4.0, pae_ce=5.0).items()}
    cfg = LossConfig(lambda_ce=6.0, orth=0.1, consistency=1.0, static_order=0.5, dynamic_order=0.1)
    assert total_loss(terms, cfg).item() == pytest.approx(6 * 1 + 0.1 * 2 + 1 * 3 + 0.5 * 4 + 0.1 * 5)


def test_interval_attention_bias_by_hand():
    hours = torch.tensor([[0.0, 1, 2, 3, 4, 5]])
    mask = torch.tensor([[True, True, True, True, True, False]])  # hour 5 is padding
    start, end = torch.tensor([[1.0, 4.5]]), torch.tensor([[3.0, 10.0]])
    bias = interval_attention_bias(hours, mask, start, end)
    assert bias[0, 0].tolist() == [-INF, -1.0, 0.0, -1.0, -INF, -INF]  # mid 2, [1, 3] inclusive
    assert bias[0, 1].tolist() == [-INF] * 6  # only the padded step lies inside [4.5, 10]


def test_masked_softmax_rows_without_keys_are_zero_not_nan():
    scores = torch.tensor([[0.0, -INF, 1.0], [-INF, -INF, -INF]])
    w = masked_softmax(scores, None)
    assert torch.allclose(w[0], torch.softmax(torch.tensor([0.0, -INF, 1.0]), -1))
    assert w[1].tolist() == [0.0, 0.0, 0.0]


def test_attention_with_bias_matches_hand_formula():
    torch.manual_seed(0)
    d = 4
    attn = MultiHeadAttention(d, num_heads=1)
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            lin.weight.copy_(torch.eye(d))
            lin.bias.zero_()
    q, kv = torch.randn(1, 2, d), torch.randn(1, 3, d)
    bias = torch.tensor([[[0.0, -1.0, -INF], [-2.0, 0.0, -0.5]]])
    key_valid = torch.tensor([[True, True, False]])
    out, weights = attn(q, kv, key_valid=key_valid, bias=bias)
    scores = q[0] @ kv[0].T / math.sqrt(d) + bias[0]
    scores[:, 2] = -INF
    expected_w = torch.softmax(scores, dim=-1)
    assert torch.allclose(weights[0], expected_w, atol=1e-6)
    assert torch.allclose(out[0], expected_w @ kv[0], atol=1e-6)


def test_index_positional_encoding_by_hand():
    pe = index_positional_encoding(3, 4)
    # w_0 = 1, w_1 = 10000^(-2/4) = 0.01; even dims sin, odd dims cos
    assert pe[0].tolist() == pytest.approx([0.0, 1.0, 0.0, 1.0])
    assert pe[2].tolist() == pytest.approx([math.sin(2), math.cos(2), math.sin(0.02), math.cos(0.02)])


def test_encoder_layer_with_weights_is_torchs_post_norm_layer():
    torch.manual_seed(0)
    ours = EncoderLayerWithWeights(8, 2, 0.0).eval()
    ref = torch.nn.TransformerEncoderLayer(8, 2, 32, 0.0, batch_first=True).eval()  # ReLU, post-norm
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 8)
    pad = torch.tensor([[False, False, False, True, True], [False] * 5])
    out, w = ours(x, pad)
    assert torch.allclose(out, ref(x, src_key_padding_mask=pad), atol=1e-5)
    assert w.shape == (2, 5, 5)
    assert torch.allclose(w.sum(-1), torch.ones(2, 5), atol=1e-6) and w[0, :, 3:].abs().sum() == 0


def test_interval_encoder_queries_are_the_authors_time_features():
    torch.manual_seed(0)
    enc = IntervalEHREncoder(8, 2).eval()
    seen = []
    enc.time_encoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    steps = torch.randn(1, 4, 8)
    hours = torch.tensor([[0.0, 1, 2, 3]])
    mask = torch.tensor([[True, True, True, False]])  # hour 3 is padding
    start, end = torch.tensor([[1.0, 5.0]]), torch.tensor([[3.0, 9.0]])
    out, valid = enc(steps, hours, mask, start, end)
    # per interval p and step t: (t - s, e - t, sigmoid((t - s)(e - t)))
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = torch.tensor([[-1, 3, sig(-3)], [0, 2, sig(0)], [1, 1, sig(1)], [2, 0, sig(0)]])
    assert torch.allclose(seen[0][0, 0], expected, atol=1e-6)
    assert seen[0][0, 1, 0].tolist() == pytest.approx([-5, 9, sig(-45)])
    assert out.shape == (1, 2, 4, 8) and torch.isfinite(out).all()
    # interval 0 holds real steps (hours 1, 2): its tokens of real steps are valid; interval 1 holds none
    assert valid.tolist() == [[[True, True, True, False], [False, False, False, False]]]
    # every query of interval 0 attends over hours 1 and 2 only, with the -|t - 2| bias
    q = enc.time_encoder(seen[0][0, 0])
    ref, _ = enc.attn(q[None], steps, bias=torch.tensor([[-INF, -1.0, 0.0, -INF]]).expand(1, 4, 4))
    assert torch.allclose(out[0, 0], ref[0], atol=1e-6)


def test_region_aware_attention_ignores_invalid_ehr_tokens():
    torch.manual_seed(0)
    layer = RegionAwareAttention(8, 2).eval()
    regions, ehr = torch.randn(3, 10, 8), torch.randn(3, 4, 8)
    none_valid = torch.zeros(3, 4, dtype=torch.bool)
    with torch.no_grad():
        alone = layer(regions)  # keys and values: the regions only
        assert torch.allclose(layer(regions, ehr, none_valid), alone, atol=1e-6)
        some = none_valid.clone()
        some[:, :2] = True
        changed = ehr.clone()
        changed[:, 2:] = 1e3  # invalid tokens
        assert torch.allclose(layer(regions, ehr, some), layer(regions, changed, some), atol=1e-6)
        assert not torch.allclose(layer(regions, ehr, some), alone, atol=1e-4)
