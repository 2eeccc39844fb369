"""Each DiPro loss, the class weights and the interval attention mask against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data_sharding.constants import reverse_progression_label
from dipro.config import LossConfig
from data_sharding.errors import DataError
from dipro.model.layers import MultiHeadAttention, masked_softmax
from dipro.model.losses import ClassWeights, balanced_class_weights, los_ce, masked_class_weighted_ce, mortality_bce, total_loss
from dipro.model.mmf import LocalIntervalEncoder, interval_attention_bias
from dipro.model.pae import pae_progression_loss, reverse_labels, static_consistency_loss
from dipro.model.std import adjacent_pairs, orthogonality_loss, pair_validity, temporal_consistency_loss

INF = float("inf")


def test_pair_validity_needs_both_cxrs_real():
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    assert pair_validity(mask).tolist() == [[True, True, False], [True, False, False]]


def test_adjacent_pairs_forward_and_reversed():
    f = torch.arange(3.0).view(1, 3, 1, 1)  # F_t = t
    assert adjacent_pairs(f).flatten().tolist() == [0, 1, 1, 2]
    assert adjacent_pairs(f, reverse=True).flatten().tolist() == [1, 0, 2, 1]


def test_orthogonality_loss_by_hand():
    # sample 0: pair0 cos = 1/sqrt2 (cos^2 0.5), pair1 orthogonal (0), pair2 invalid (cos^2 1, ignored)
    # sample 1: pair0 parallel (1), pairs 1-2 invalid
    s = torch.tensor([[[[1.0, 0]], [[1, 0]], [[1, 0]]], [[[2.0, 0]], [[1, 0]], [[1, 0]]]])
    d = torch.tensor([[[[1.0, 1]], [[0, 1]], [[3, 0]]], [[[5.0, 0]], [[0, 1]], [[0, 1]]]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    # per sample: (0.5 + 0)/2 = 0.25 and 1/1; mean over samples
    assert orthogonality_loss(s, d, valid).item() == pytest.approx((0.25 + 1.0) / 2)


def test_temporal_consistency_loss_by_hand():
    s = torch.tensor([[[[0.0, 0]], [[1, 1]], [[3, 1]]]])  # [B=1,P=3,R=1,d=2]
    all_valid = torch.tensor([[True, True, True]])
    # ||S1-S0||^2 = 2, ||S2-S1||^2 = 4; N = 2 terms x d=2
    assert temporal_consistency_loss(s, all_valid).item() == pytest.approx(6 / 4)
    last_invalid = torch.tensor([[True, True, False]])
    assert temporal_consistency_loss(s, last_invalid).item() == pytest.approx(2 / 2)
    one_pair = torch.tensor([[True, False, False]])
    assert temporal_consistency_loss(s, one_pair).item() == 0.0


def test_static_consistency_loss_by_hand():
    s = torch.tensor([[[[1.0, 2.0]], [[9.0, 9.0]]]])
    s_rev = torch.tensor([[[[0.0, 0.0]], [[0.0, 0.0]]]])
    valid = torch.tensor([[True, False]])
    assert static_consistency_loss(s, s_rev, valid).item() == pytest.approx(5 / 2)


def test_balanced_class_weights_by_hand():
    w = balanced_class_weights([[30, 10, 50, 200]], "x")
    assert w.tolist()[0] == pytest.approx([90 / 90, 90 / 30, 90 / 150])  # n / (3 n_c); label 3 not counted
    with pytest.raises(DataError, match="x"):
        balanced_class_weights([[1, 2]], "x")


def test_class_weights_buffers_from_label_stats():
    stats = {
        "disease_progression": {"task": [[30, 10, 50, 1]] * 7, "region": [[10, 10, 10, 5]] * 7},
        "mortality_los": {"mortality": [80, 20], "los_bin": [1, 1, 1, 1], "region": [[10, 20, 30, 0]] * 7},
    }
    prog = ClassWeights("disease_progression", stats)
    assert prog.progression[3].tolist() == pytest.approx([1.0, 3.0, 0.6])
    assert prog.region[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    mort = ClassWeights("mortality", stats)
    assert mort.mortality_pos_weight.item() == pytest.approx(80 / 20)
    assert mort.region[0].tolist() == pytest.approx([60 / 30, 60 / 60, 60 / 90])
    assert {"progression", "region", "mortality_pos_weight"} <= set(dict(mort.named_buffers()))
    with pytest.raises(DataError, match="mortality_los.region"):
        ClassWeights("mortality", {"mortality_los": {"mortality": [1, 1]}})


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


def test_interval_without_ehr_gives_the_no_ehr_token():
    torch.manual_seed(0)
    enc = LocalIntervalEncoder(8, 2, 0.0).eval()
    steps = torch.randn(1, 4, 8)
    hours = torch.tensor([[0.0, 1, 2, 3]])
    mask = torch.tensor([[True, True, True, True]])
    out = enc(steps, hours, mask, torch.tensor([[0.5, 10.0]]), torch.tensor([[2.5, 20.0]]))
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 1], enc.no_ehr_token.detach())
    assert not torch.equal(out[0, 0], enc.no_ehr_token.detach())
    # a sample whose EHR is all padding: every interval falls back, still finite
    out = enc(steps, hours, torch.zeros_like(mask), torch.tensor([[0.5, 1.0]]), torch.tensor([[2.5, 3.0]]))
    assert torch.equal(out[0], enc.no_ehr_token.detach().expand(2, -1))
