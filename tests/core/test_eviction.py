# SPDX-License-Identifier: Apache-2.0
"""Eviction planning: exact budgets, score ordering, the tie rule and unscored layers."""

from __future__ import annotations

import math

import pytest
import torch

from kvzip_plugin.eviction import budget, plan_eviction, plan_head_level
from kvzip_plugin.types import EvictionPlan, ScoreMap

L, H, N = 3, 2, 50
ALL_LAYERS = (0, 1, 2)
RATIOS = [0.01, 0.1, 0.3, 0.5, 0.77, 0.99]


def random_scores(seed: int = 0, shape: tuple[int, int, int] = (L, H, N)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen)


def score_map(scores: torch.Tensor | None = None, scored_layers=ALL_LAYERS) -> ScoreMap:
    return ScoreMap(scores=random_scores() if scores is None else scores, scored_layers=tuple(scored_layers))


# ---------------------------------------------------------------------------------------------- budget


@pytest.mark.parametrize(
    ("ratio", "n", "expected"),
    [
        (0.3, 10, 3),
        (0.29, 100, 29),  # 0.29 * 100 == 28.999999999999996 in floats: must still give 29
        (0.57, 100, 57),  # 56.99999999999999
        (0.35, 180, 63),
        (0.25, 10, 2),  # floor, not round
        (0.29, 10, 2),
        (0.5, 7, 3),
        (0.99, 10, 9),
        (1.0, 10, 10),
        (0.3, 300, 90),
        (0.7, 100, 70),
        (0.01, 10, 1),  # floor would give 0: clamped to 1
        (1e-6, 1, 1),
        (1.5, 10, 10),  # clamped to n
        (0.3, 0, 0),
        (1.0, 0, 0),
    ],
)
def test_budget(ratio, n, expected):
    assert budget(ratio, n) == expected


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 50, 97, 100, 180, 300, 1000])
@pytest.mark.parametrize("pct", [1, 10, 20, 29, 30, 33, 35, 50, 57, 70, 90, 99, 100])
def test_budget_floor_of_exact_fraction(n, pct):
    # exact integer arithmetic: floor(pct / 100 * n), clamped to [1, n]
    assert budget(pct / 100, n) == min(n, max(1, (pct * n) // 100))


# ---------------------------------------------------------------------------------------- ScoreMap


def test_score_map_rejects_nan():
    scores = random_scores()
    scores[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ScoreMap(scores=scores, scored_layers=ALL_LAYERS)


@pytest.mark.parametrize("shape", [(N,), (H, N), (1, L, H, N)])
def test_score_map_rejects_wrong_dims(shape):
    with pytest.raises(ValueError):
        ScoreMap(scores=torch.zeros(shape), scored_layers=(0,))


@pytest.mark.parametrize("layers", [(3,), (-1,), (0, 5)])
def test_score_map_rejects_out_of_range_layers(layers):
    with pytest.raises(ValueError):
        ScoreMap(scores=random_scores(), scored_layers=layers)


def test_score_map_properties():
    sm = score_map()
    assert (sm.n_layers, sm.n_kv_heads, sm.n_context) == (L, H, N)


# ---------------------------------------------------------------------------------------- structures


def _check_plan_basics(plan: EvictionPlan, structure: str, layers=ALL_LAYERS) -> None:
    assert plan.keep.dtype == torch.bool
    assert plan.keep.shape == (L, H, N)
    assert plan.structure == structure
    assert plan.compressible_layers == tuple(layers)


@pytest.mark.parametrize("ratio", RATIOS)
def test_pair_keeps_global_top(ratio):
    scores = random_scores()
    plan = plan_eviction(score_map(scores), ratio, "pair")
    _check_plan_basics(plan, "pair")
    k = budget(ratio, L * H * N)
    assert int(plan.keep.sum()) == k
    kept, evicted = scores[plan.keep], scores[~plan.keep]
    assert kept.min() >= evicted.max()
    # the kept set is exactly the top-k pairs (random floats: no ties)
    expected = torch.zeros(L * H * N, dtype=torch.bool)
    expected[torch.topk(scores.flatten(), k).indices] = True
    assert torch.equal(plan.keep.flatten(), expected)
    assert plan.achieved_ratio == pytest.approx(k / (L * H * N))


def test_pair_budget_is_non_uniform():
    # one head has all the high scores: a global threshold gives it everything
    scores = torch.zeros(L, H, N)
    scores[1, 0] = 1.0 + torch.arange(N, dtype=torch.float32)
    plan = plan_eviction(score_map(scores), 1 / 6, "pair")
    assert int(plan.keep.sum()) == N
    assert plan.keep[1, 0].all()
    assert int(plan.keep.sum()) == int(plan.keep[1, 0].sum())
    assert not plan.is_uniform()


@pytest.mark.parametrize("ratio", RATIOS)
def test_head_keeps_top_per_head(ratio):
    scores = random_scores(seed=1)
    plan = plan_eviction(score_map(scores), ratio, "head")
    _check_plan_basics(plan, "head")
    k = budget(ratio, N)
    assert torch.equal(plan.kept_counts, torch.full((L, H), k))
    assert plan.is_uniform()
    for layer in range(L):
        for head in range(H):
            row, keep = scores[layer, head], plan.keep[layer, head]
            if (~keep).any():
                assert row[keep].min() >= row[~keep].max()
            expected = torch.zeros(N, dtype=torch.bool)
            expected[torch.topk(row, k).indices] = True
            assert torch.equal(keep, expected)
    assert plan.achieved_ratio == pytest.approx(k / N)


@pytest.mark.parametrize("ratio", RATIOS)
def test_layer_keeps_same_positions_for_all_heads(ratio):
    scores = random_scores(seed=2)
    plan = plan_eviction(score_map(scores), ratio, "layer")
    _check_plan_basics(plan, "layer")
    k = budget(ratio, N)
    for layer in range(L):
        for head in range(1, H):
            assert torch.equal(plan.keep[layer, head], plan.keep[layer, 0])
        assert int(plan.keep[layer, 0].sum()) == k
        layer_score = torch.stack([scores[layer, h] for h in range(H)]).max(dim=0).values
        keep = plan.keep[layer, 0]
        if (~keep).any():
            assert layer_score[keep].min() >= layer_score[~keep].max()
        expected = torch.zeros(N, dtype=torch.bool)
        expected[torch.topk(layer_score, k).indices] = True
        assert torch.equal(keep, expected)
    assert plan.is_uniform()


def test_layer_uses_max_not_mean_over_heads():
    # position 0: one very high head, one very low head (mean 0.5, max 1.0)
    # position 1: both heads 0.6 (mean 0.6, max 0.6)
    scores = torch.zeros(1, 2, 4)
    scores[0, 0, 0], scores[0, 1, 0] = 1.0, 0.0
    scores[0, :, 1] = 0.6
    plan = plan_eviction(ScoreMap(scores=scores, scored_layers=(0,)), 0.25, "layer")
    assert plan.keep[0, :, 0].all()
    assert not plan.keep[0, :, 1:].any()


@pytest.mark.parametrize("structure", ["pair", "head", "layer"])
def test_ratio_one_keeps_everything(structure):
    plan = plan_eviction(score_map(), 1.0, structure)
    assert plan.keep.all()
    assert plan.is_identity
    assert plan.achieved_ratio == 1.0


@pytest.mark.parametrize("structure", ["pair", "head", "layer"])
def test_below_one_is_not_identity(structure):
    plan = plan_eviction(score_map(), 0.5, structure)
    assert not plan.is_identity


@pytest.mark.parametrize("structure", ["pair", "head", "layer"])
def test_unscored_layers_kept(structure):
    scores = random_scores(seed=3)
    # make the unscored layer the most important: it must still not take any budget
    scores[1] += 10.0
    ratio = 0.3
    plan = plan_eviction(score_map(scores, scored_layers=(0, 2)), ratio, structure)
    _check_plan_basics(plan, structure, layers=(0, 2))
    assert plan.keep[1].all()
    kept_scored = int(plan.keep[[0, 2]].sum())
    total_scored = 2 * H * N
    if structure == "pair":
        assert kept_scored == budget(ratio, total_scored)
    else:
        assert kept_scored == 2 * H * budget(ratio, N)
    assert plan.achieved_ratio == pytest.approx(kept_scored / total_scored)
    # counting every layer would give a different number
    assert plan.achieved_ratio != pytest.approx(float(plan.keep.float().mean()))


def test_no_scored_layers_keeps_everything():
    plan = plan_eviction(score_map(scored_layers=()), 0.3, "pair")
    assert plan.keep.all()
    assert plan.achieved_ratio == 1.0


def test_tie_rule_pair_keeps_lowest_flat_indices():
    scores = torch.full((L, H, N), 0.5)
    ratio = 0.3
    plan = plan_eviction(score_map(scores), ratio, "pair")
    k = budget(ratio, L * H * N)
    flat = plan.keep.flatten()
    assert flat[:k].all()
    assert not flat[k:].any()


def test_tie_rule_pair_with_unscored_layer():
    scores = torch.full((L, H, N), 0.5)
    plan = plan_eviction(score_map(scores, scored_layers=(0, 2)), 0.5, "pair")
    k = budget(0.5, 2 * H * N)  # == H * N: all of layer 0, none of layer 2
    assert k == H * N
    assert plan.keep[0].all() and plan.keep[1].all()
    assert not plan.keep[2].any()


@pytest.mark.parametrize("structure", ["head", "layer"])
def test_tie_rule_per_head_keeps_first_positions(structure):
    scores = torch.full((L, H, N), 0.5)
    ratio = 0.3
    k = budget(ratio, N)
    plan = plan_eviction(score_map(scores), ratio, structure)
    assert plan.keep[..., :k].all()
    assert not plan.keep[..., k:].any()


def test_tie_rule_partial_ties():
    # distinct high scores are kept first, then ties broken by position
    scores = torch.zeros(1, 1, 10)
    scores[0, 0, 7] = 2.0
    scores[0, 0, [2, 5, 8]] = 1.0
    plan = plan_eviction(ScoreMap(scores=scores, scored_layers=(0,)), 0.3, "head")
    assert plan.keep[0, 0].nonzero().flatten().tolist() == [2, 5, 7]


@pytest.mark.parametrize("structure", ["pair", "head", "layer"])
def test_deterministic(structure):
    a = plan_eviction(score_map(random_scores(seed=4)), 0.37, structure)
    b = plan_eviction(score_map(random_scores(seed=4)), 0.37, structure)
    assert torch.equal(a.keep, b.keep)
    # and with ties too
    ties = torch.randint(0, 3, (L, H, N), generator=torch.Generator().manual_seed(5)).float()
    c = plan_eviction(score_map(ties), 0.37, structure)
    d = plan_eviction(score_map(ties.clone()), 0.37, structure)
    assert torch.equal(c.keep, d.keep)


@pytest.mark.parametrize("structure", ["pair", "head", "layer"])
@pytest.mark.parametrize("scored", [ALL_LAYERS, (0, 2), (1,)])
def test_achieved_ratio_is_kept_over_total(structure, scored):
    plan = plan_eviction(score_map(random_scores(seed=6), scored_layers=scored), 0.42, structure)
    layers = list(scored)
    kept = int(plan.keep[layers].sum())
    total = len(layers) * H * N
    assert plan.achieved_ratio == pytest.approx(kept / total)


def test_does_not_modify_scores():
    scores = random_scores(seed=7)
    before = scores.clone()
    plan_eviction(score_map(scores), 0.3, "pair")
    assert torch.equal(scores, before)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01, 2.0, math.nan])
@pytest.mark.parametrize("structure", ["pair", "head", "layer"])
def test_invalid_ratio(ratio, structure):
    with pytest.raises(ValueError):
        plan_eviction(score_map(), ratio, structure)


@pytest.mark.parametrize("structure", ["token", "", "PAIR", "head_level"])
def test_unknown_structure(structure):
    with pytest.raises(ValueError):
        plan_eviction(score_map(), 0.5, structure)


def test_kept_indices():
    plan = plan_eviction(score_map(random_scores(seed=8)), 0.3, "head")
    for layer in range(L):
        idx = plan.kept_indices(layer)
        assert len(idx) == H
        for head, positions in enumerate(idx):
            assert positions.tolist() == sorted(positions.tolist())
            assert positions.tolist() == plan.keep[layer, head].nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------- head level


def random_head_scores(seed: int = 0) -> torch.Tensor:
    return torch.rand((L, H), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ratio", [0.01, 0.2, 0.5, 0.7, 0.99])
def test_head_level_keeps_whole_top_heads(ratio):
    head_scores = random_head_scores(seed=9)
    plan = plan_head_level(head_scores, N, ratio, ALL_LAYERS)
    assert plan.keep.shape == (L, H, N)
    assert plan.structure == "head_level"
    assert plan.compressible_layers == ALL_LAYERS
    row_all = plan.keep.all(dim=-1)
    row_none = ~plan.keep.any(dim=-1)
    assert (row_all | row_none).all()
    k = budget(ratio, L * H)
    assert int(row_all.sum()) == k
    expected = torch.zeros(L * H, dtype=torch.bool)
    expected[torch.topk(head_scores.flatten(), k).indices] = True
    assert torch.equal(row_all.flatten(), expected)
    if (~row_all).any():
        assert head_scores[row_all].min() >= head_scores[~row_all].max()
    assert plan.achieved_ratio == pytest.approx(k / (L * H))


def test_head_level_unscored_layers_kept():
    head_scores = random_head_scores(seed=10)
    head_scores[1] = -5.0  # least important, but not compressible
    plan = plan_head_level(head_scores, N, 0.5, (0, 2))
    assert plan.keep[1].all()
    k = budget(0.5, 2 * H)
    assert int(plan.keep[[0, 2]].all(dim=-1).sum()) == k
    assert plan.achieved_ratio == pytest.approx(k / (2 * H))


def test_head_level_ratio_one_and_ties():
    assert plan_head_level(random_head_scores(), N, 1.0, ALL_LAYERS).is_identity
    plan = plan_head_level(torch.ones(L, H), N, 0.5, ALL_LAYERS)
    assert plan.keep.all(dim=-1).flatten().tolist() == [True, True, True, False, False, False]


def test_head_level_invalid_inputs():
    with pytest.raises(ValueError):
        plan_head_level(random_head_scores(), N, 0.0, ALL_LAYERS)
    with pytest.raises(ValueError):
        plan_head_level(random_head_scores(), N, 1.5, ALL_LAYERS)
    with pytest.raises(ValueError):
        plan_head_level(torch.rand(L, H, N), N, 0.5, ALL_LAYERS)
