"""The split, routing rule, pooling and parameter accounting."""

import numpy as np
import pytest
import torch

from mixpert_train.backbones import get_backbone
from mixpert_train.errors import MixpertError
from mixpert_train.model import (DOMAINS, VERSATILE, MixpertConfig, build_model, margins, parameter_report,
                                 pool_matrix, route)


def tiny_cfg(**kw):
    return MixpertConfig.for_backbone(get_backbone("tiny"), **kw)


SCORES = np.array([
    [0.90, 0.05, 0.02, 0.02, 0.01],  # sure: chart (margin 0.85)
    [0.10, 0.50, 0.30, 0.05, 0.05],  # doc, margin 0.20
    [0.05, 0.05, 0.05, 0.05, 0.80],  # sure: general (margin 0.75)
    [0.30, 0.05, 0.05, 0.35, 0.25],  # ocr, top1 0.35, margin 0.05
])


def test_route_direct():
    assert route(SCORES, strategy="direct") == ["chart", "doc", "general", "ocr"]


def test_route_score_difference_default_tau():
    assert route(SCORES) == ["chart", VERSATILE, "general", VERSATILE]  # paper default tau=0.6
    assert route(SCORES, tau=0.1) == ["chart", "doc", "general", VERSATILE]
    assert route(SCORES, tau=0.0) == route(SCORES, strategy="direct")


def test_route_score_threshold():
    assert route(SCORES, strategy="score-threshold", lam=0.45) == ["chart", "doc", "general", VERSATILE]
    # at the threshold itself: versatile (top1 <= lam), as top1 - top2 <= tau (see the saturated-softmax test)
    assert route(SCORES, strategy="score-threshold", lam=0.5) == ["chart", VERSATILE, "general", VERSATILE]
    assert route(SCORES, strategy="score-threshold", lam=0.95) == [VERSATILE] * 4


def test_route_edges_of_the_unit_interval_hold_for_a_saturated_softmax():
    """A float32 softmax of large logits is exactly [1, 0, ...]: tau = 1 and lam = 1 still send it to versatile
    (what `--tau 1` promises), tau = 0 sends only an exact tie there, never a winner."""
    logits = torch.tensor([[200.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 300.0]])
    sat = torch.softmax(logits, dim=-1).numpy()
    assert sat.max(axis=1).tolist() == [1.0, 1.0] and np.sort(sat, axis=1)[:, -2].tolist() == [0.0, 0.0]
    assert route(sat, tau=1.0) == [VERSATILE] * 2 and route(sat, strategy="score-threshold", lam=1.0) == [VERSATILE] * 2
    assert route(sat, tau=0.999) == ["chart", "general"]
    tie = np.array([[0.4, 0.4, 0.1, 0.05, 0.05]])
    assert route(tie, tau=0.0) == [VERSATILE] and route(tie, strategy="direct") == ["chart"]


def test_route_nan_goes_to_versatile_and_bad_input_is_refused():
    s = SCORES.copy()
    s[1, 2] = np.nan
    assert route(s, strategy="direct")[1] == VERSATILE
    with pytest.raises(MixpertError, match="expected \\[B, 5\\]"):
        route(np.zeros((2, 4)))
    with pytest.raises(MixpertError, match="unknown routing strategy"):
        route(SCORES, strategy="top2")


def test_margins():
    np.testing.assert_allclose(margins(SCORES), [0.85, 0.20, 0.75, 0.05], atol=1e-12)


def test_pool_matrix():
    p = pool_matrix([2, 1, 3])
    assert p.shape == (3, 6)
    np.testing.assert_allclose(p.sum(1), 1.0)
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0, 0, 0, 0])
    assert np.array_equal(pool_matrix([2, 1], per_crop=True), np.eye(3, dtype=np.float32))
    with pytest.raises(MixpertError):
        pool_matrix([1, 0])


def test_router_pools_all_tokens_of_all_crops_of_each_image():
    model = build_model(tiny_cfg(), seed=1)
    torch.manual_seed(0)
    hidden = torch.randn(5, 16, 192)  # tiny: 16 tokens a crop
    scores = model.router(hidden, torch.from_numpy(pool_matrix([3, 2])))
    r = model.router  # independent: concatenate the tokens of an image's crops and average them once
    for b, (lo, hi) in enumerate([(0, 3), (3, 5)]):
        pooled = hidden[lo:hi].reshape(-1, 192).mean(0, keepdim=True)
        expect = torch.softmax(r.fc2(torch.nn.functional.gelu(r.fc1(pooled))), -1)
        torch.testing.assert_close(scores[b:b + 1], expect, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scores.sum(-1), torch.ones(2))


@pytest.mark.parametrize("k", [0, 1, 2, 6])
def test_split_depths(k):
    cfg = tiny_cfg(expert_layers=k)
    model = build_model(cfg)
    assert len(model.trunk.layers) == 6 - k and all(len(e.layers) == k for e in model.experts.values())
    assert list(model.experts) == list(DOMAINS) + [VERSATILE]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model.experts["math"](model.trunk(x))
    assert out.shape == (2, 16, 256)  # tiny: 64 px crops of 16 px patches


def test_bad_split_is_refused():
    with pytest.raises(MixpertError, match="within 0..6"):
        tiny_cfg(expert_layers=7)
    with pytest.raises(MixpertError, match="unknown routing strategy"):
        tiny_cfg(strategy="argmax")


def test_config_round_trip():
    cfg = tiny_cfg(expert_layers=3, tau=0.3, strategy="direct")
    assert MixpertConfig.from_dict(cfg.to_dict()) == cfg


def test_parameter_report_matches_the_paper_table_6():
    r = parameter_report(MixpertConfig.for_backbone(get_backbone("llava-ov-7b")))
    # paper: five experts of 2 layers + projector add 237.1M; the router adds 1.3M and is all that is activated
    assert abs(r["added_experts"] - 237.1e6) / 237.1e6 < 0.01
    assert abs(r["router"] - 1.3e6) / 1.3e6 < 0.03  # 1.334M; the paper rounds to one decimal
    assert r["router"] == 1152 * 1152 + 1152 + 1152 * 5 + 5  # by hand
    layer = 4 * (1152 * 1152 + 1152) + 2 * 1152 * 2 + (1152 * 4304 + 4304) + (4304 * 1152 + 1152)
    projector = 1152 * 3584 + 3584 + 3584 * 3584 + 3584
    assert r["expert"] == 2 * layer + projector  # by hand: 2 so400m layers + projector
    assert r["mixpert_activated"] - r["baseline_activated"] == r["router"]
