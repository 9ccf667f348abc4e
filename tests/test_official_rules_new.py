"""Self-tests of the newer transcriptions in official_rules.py (ClusCa, SpeCa, MagCache, DuCa kv-norm,
Δ-DiT) on small cases worked out by hand from the official code (see each function's docstring)."""
import math

import numpy as np
import pytest
import torch

from official_rules import (clusca_full_refresh, clusca_kmeans, clusca_refresh_mlp, clusca_rng_calls,
                            clusca_schedule, clusca_select_tokens, delta_dit_plan, duca_kv_norm_choose,
                            duca_kv_norm_score, magcache_decisions, magcache_fit, magcache_nearest_interp,
                            speca_decisions, speca_error, speca_taylor, speca_threshold)

# ------------------------------------------------------------------------------------------ ClusCa


def test_clusca_schedule_is_taylorseers():
    types = clusca_schedule(50, 4)
    full = [k for k, t in enumerate(types) if t == "full"]
    assert full == [0, 1] + list(range(5, 50, 4))  # k = 0, 1, then 1 + 4j: 14 full steps, the last one full
    assert len(full) == 14 and types[-1] == "full"
    assert sum(t == "full" for t in clusca_schedule(250, 4)) == 64  # DDPM-250
    assert clusca_schedule(6, 3) == ["full", "full", "ClusCa", "ClusCa", "full", "ClusCa"]


def test_clusca_kmeans_lloyd_in_l1():
    x = torch.tensor([[0.0, 1.0, 2.0, 10.0, 11.0, 12.0]]).unsqueeze(-1)
    labels, centroids, iterations = clusca_kmeans(x, 2, init_idx=torch.tensor([[0, 1]]))
    # C = [0, 1] → labels 0,1,1,1,1,1 → C = [0, 7.2] → labels 0,0,0,1,1,1 → C = [1, 11] → unchanged: stop
    assert labels.tolist() == [[0, 0, 0, 1, 1, 1]]
    assert centroids.flatten().tolist() == [1.0, 11.0] and iterations == 3
    # warm start from those centroids: converged at once
    labels2, centroids2, iterations2 = clusca_kmeans(x, 2, centroids=centroids)
    assert iterations2 == 1 and torch.equal(labels2, labels) and torch.equal(centroids2, centroids)
    # L1, not L2: (3, 0) is nearer c0 = (0, 0) in L1 (3 < 2 + 1.2) but nearer c1 = (1, 1.2) in L2 (3 > 2.33)
    y = torch.tensor([[[0.0, 0.0], [1.0, 1.2], [3.0, 0.0]]])
    first, _, _ = clusca_kmeans(y, 2, init_idx=torch.tensor([[0, 1]]), max_iter=1)
    assert first.tolist() == [[0, 1, 0]]


def test_clusca_empty_cluster_zero_centroid_and_token_zero():
    x = torch.tensor([[0.0, 0.0, 5.0, 5.0]]).unsqueeze(-1)
    labels, centroids, iterations = clusca_kmeans(x, 3, init_idx=torch.tensor([[0, 1, 2]]))
    assert labels.tolist() == [[0, 0, 2, 2]]  # the tie goes to the first centroid: cluster 1 is empty
    assert centroids.flatten().tolist() == [0.0, 0.0, 5.0] and iterations == 1
    fresh = clusca_select_tokens(labels, 3, torch.tensor([[0.1, 0.9, 0.3, 0.2]]))
    assert fresh.tolist() == [[1, 0, 2]]  # argmax per cluster; the empty cluster duplicates token 0
    # an empty cluster whose centroid is not already zero becomes zero
    z = torch.tensor([[1.0, 1.0, 9.0]]).unsqueeze(-1)
    _, c, _ = clusca_kmeans(z, 3, init_idx=torch.tensor([[0, 1, 2]]), max_iter=1)
    assert c.flatten().tolist() == [1.0, 0.0, 9.0]


def test_clusca_refresh_overwrites_f0_and_spreads_the_sum():
    labels = torch.tensor([[0, 0, 2, 2]])
    fresh = torch.tensor([[1, 0, 2]])
    out = torch.tensor([[[1.0], [2.0], [3.0]]])  # clusters 0, 1 (empty → token 0), 2
    f0 = torch.tensor([[[10.0], [20.0], [30.0], [40.0]]])
    f1 = torch.tensor([[[1.0], [1.0], [1.0], [1.0]]])
    factors, forecast = clusca_refresh_mlp([f0, f1], fresh, out, labels, 3, distance=-2)
    assert factors[0].flatten().tolist() == [2.0, 1.0, 3.0, 40.0]  # scattered into F_0
    assert forecast.flatten().tolist() == [0.0, -1.0, 1.0, 38.0]  # F_0' + F_1·(−2): old terms still added
    assert f0.flatten().tolist() == [10.0, 20.0, 30.0, 40.0]  # (the transcription does not mutate its input)
    # propagation p = 0.5: cluster 0 spreads 1 + 2 = 3 (the sum, token 0 counted twice), cluster 2 spreads 3
    factors, _ = clusca_refresh_mlp([f0, f1], fresh, out, labels, 3, distance=-1, propagation_ratio=0.5)
    assert factors[0].flatten().tolist() == [2.5, 2.0, 3.0, 21.5]
    factors, _ = clusca_refresh_mlp([f0, f1], fresh, out, labels, 3, distance=-1, propagation_ratio=0.5,
                                    tokens_per_cluster=2)  # k > 1: the mean (1.5)
    assert factors[0].flatten().tolist() == [1.75, 1.25, 3.0, 21.5]


def test_clusca_next_full_step_differences_use_the_refreshed_f0():
    old = [torch.tensor([2.0, 1.0]), torch.tensor([0.5, 0.5])]  # F_0 after a ClusCa refresh
    new = clusca_full_refresh(old, torch.tensor([6.0, 5.0]), gap=-4, step=40, num_steps=50)
    assert [f.tolist() for f in new] == [[6.0, 5.0], [-1.0, -1.0], [0.375, 0.375]]
    assert len(clusca_full_refresh(old, torch.tensor([0.0, 0.0]), -1, 49, 50)) == 1  # first step: emptied


def test_clusca_rng_order():
    calls = clusca_rng_calls(7, 2, rows=4, num_tokens=16, clusters=3, interval=4)
    names = [c[0] for c in calls]
    # z; k0 full (K-means init at block 1) + noise; k1 full + noise; k2–k4 ClusCa: 2 rand + noise; k5 full …
    assert names == ["randn", "randint", "randn", "randn"] + ["rand", "rand", "randn"] * 3 + ["randn", "rand", "rand",
                                                                                                 "randn"]
    assert calls[1] == ("randint", (4, 3), 0, 1) and calls[4] == ("rand", (4, 16), 2, 0)


# ------------------------------------------------------------------------------------------- SpeCa


def test_speca_threshold():
    assert speca_threshold(0, 50) == pytest.approx(0.1 * 0.01 ** 0.02)
    assert speca_threshold(6, 50) == pytest.approx(0.1 * 10 ** -0.28)  # 0.052481
    assert speca_threshold(30, 50) == 0.01 and speca_threshold(49, 50) == 0.01


def test_speca_warm_up_and_run_lengths():
    types, verified, _ = speca_decisions(50, lambda k: 0.0)
    full = [k for k, t in enumerate(types) if t == "full"]
    assert full == [0, 2, 8, 14, 20, 26, 32, 38, 44]  # never too large: 5 Taylor steps per run
    assert [k for k in range(12) if verified[k]] == [5, 6, 7, 11]  # from the 3rd Taylor step of a run
    types, verified, _ = speca_decisions(50, lambda k: 1e9)
    full = [k for k, t in enumerate(types) if t == "full"]
    assert full == [0, 2] + list(range(6, 50, 4))  # always too large: 3 Taylor steps per run (min 2 + the verified)
    assert types[47:] == ["Taylor"] * 3 and verified[49]


def test_speca_error_decides_the_next_step_against_its_threshold():
    below, _, _ = speca_decisions(50, lambda k: {5: 0.05}.get(k, 0.0))
    above, verified, _ = speca_decisions(50, lambda k: {5: 0.053}.get(k, 0.0))
    assert below[6] == "Taylor" and above[6] == "full"  # threshold at k = 6 is 0.05248
    assert above[:7] == ["full", "Taylor", "full", "Taylor", "Taylor", "Taylor", "full"]
    assert [k for k in range(7, 14) if verified[k]] == [9, 10, 11] and above[12] == "full"


def test_speca_max_one_and_min_zero():
    types, verified, _ = speca_decisions(8, lambda k: 0.0, min_taylor_steps=0, max_taylor_steps=1)
    assert types == ["full", "Taylor", "full", "Taylor"] * 2 and not any(verified)


def test_speca_taylor_gaps():
    types, _, _ = speca_decisions(10, lambda k: 0.0)
    held, forecasts = speca_taylor(types, 10, features=lambda k: torch.tensor([1.0 if k == 0 else 3.0]))
    assert held[0] == 1 and held[2] == 2  # activated [9, 9]: no order at k = 0; k = 2: gap −2
    assert forecasts[1].item() == 1.0  # F_0 alone
    assert forecasts[3].item() == 4.0  # F_1 = (3 − 1)/(−2) = −1; 3 + (−1)·(−1)


def test_speca_error_measures_and_the_view_crash():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    f = torch.tensor([[[1.0, 1.0], [2.0, 8.0]]])
    assert speca_error(x, f, "l1") == pytest.approx((0 + 1 + 1 + 4) / 4)
    assert speca_error(x, f, "l2") == pytest.approx(math.sqrt((0 + 1 + 1 + 16) / 4))
    assert speca_error(x, f, "relative_l1") == pytest.approx((0 + 1 + 0.5 + 0.5) / 4)
    assert speca_error(x, f, "relative_l2") == pytest.approx(math.sqrt((0 + 1 + 0.25 + 0.25) / 4))
    assert speca_error(x, f, "all") == speca_error(x, f, "relative_l1")
    assert speca_error(x, x.clone(), "cosine_similarity") == pytest.approx(0.0, abs=1e-6)
    tiny = torch.tensor([[[1e-8]]])
    assert speca_error(tiny * 2, tiny, "relative_l1") > 0.9  # near-zero denominators: no floor but 1e-10
    # the official residual stream keeps PatchEmbed's transposed strides: .view fails there
    stream = torch.randn(2, 4, 3).transpose(1, 2)  # (B, N, D) = (2, 3, 4) with strides (12, 1, 3)
    assert not stream.is_contiguous()
    for metric in ("cosine_similarity", "all"):
        with pytest.raises(RuntimeError):
            speca_error(stream, stream + 1, metric)


# ---------------------------------------------------------------------------------------- MagCache


RATIOS = [1.0, 1.1, 0.9, 0.95, 0.9, 1.0, 1.0, 0.8, 1.0, 1.0]


def test_magcache_official_decisions():
    compute, errors = magcache_decisions(RATIOS, 10, 0.12, 0.2, 2)
    assert compute == [True, True, False, True, False, True, False, True, False, False]
    assert errors[:2] == [None, None] and errors[3] == pytest.approx(0.1 + 0.145)
    compute, _ = magcache_decisions(RATIOS, 10, 0.12, 0.2, 1)
    assert compute[8:] == [False, True]  # K = 1: the second consecutive skip is refused
    compute, _ = magcache_decisions(RATIOS, 10, 0.12, 0.3, 2)  # int(0.3·10 + 0.5) = 3
    assert compute[:4] == [True, True, True, False]


def test_magcache_flavors_differ_where_the_code_does():
    ratios = [1.0, 1.0, 0.5, 1.0]
    official, _ = magcache_decisions(ratios, 4, 0.5, 0.25, 3)
    wan, _ = magcache_decisions(ratios, 4, 0.5, 0.25, 3, flavor="wan")
    assert official[2] is False and wan[2] is True  # err 0.5: ≤ skips, < computes
    # retention: int(r·T + 0.5) vs int(T·r)
    assert magcache_decisions([1.0] * 10, 10, 0.1, 0.15, 9)[0][:2] == [True, True]
    assert magcache_decisions([1.0] * 10, 10, 0.1, 0.15, 9, flavor="wan")[0][:2] == [True, False]
    # diffusers: nothing stored yet at step 0 → compute, where the official code would skip
    assert magcache_decisions([1.0] * 4, 4, 0.1, 0.0, 9, flavor="diffusers")[0] == [True, False, False, False]
    assert magcache_decisions([1.0] * 4, 4, 0.1, 0.0, 9)[0][0] is False
    # FLUX's forced step: round(k·27/(T−1)) == 11 computes (T = 28: k = 11)
    forced, _ = magcache_decisions([1.0] * 28, 28, 1.0, 0.1, 100, flux_forced_step=True)
    assert [k for k in range(3, 28) if forced[k]] == [11]
    # float32 accumulators in diffusers
    _, errs = magcache_decisions([1.0, 0.9, 0.9], 3, 1.0, 0.2, 5, flavor="diffusers")
    assert errs[1] == float(abs(1.0 - torch.tensor(0.9, dtype=torch.float32)))


def test_magcache_fit_and_interp():
    r0 = torch.ones(1, 2, 2)
    r1 = 2 * torch.ones(1, 2, 2)
    r2 = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])
    curve = magcache_fit([r0, r1, r2])
    assert curve == [1.0, 2.0, round((5 + 1) / (2 * math.sqrt(8)), 5)]  # 1.06066
    loose = magcache_fit([r0, r1, r2], flavor="diffusers")
    assert loose[1] == pytest.approx(2.0) and loose[2] != curve[2]
    assert magcache_nearest_interp(np.arange(6.0), 5).tolist() == [0.0, 1.0, 2.0, 4.0, 5.0]  # 2.5 → 2
    assert magcache_nearest_interp(np.arange(4.0), 3).tolist() == [0.0, 2.0, 3.0]  # 1.5 → 2
    assert magcache_nearest_interp(np.arange(4.0), 1).tolist() == [3.0]


# ----------------------------------------------------------------------------------- DuCa kv-norm


def test_duca_kv_norm_prefers_small_values():
    v = torch.tensor([[[[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]],
                       [[0.0, 1.0], [0.0, 2.0], [6.0, 8.0]]]])  # (B=1, H=2, N=3, d=2)
    score = duca_kv_norm_score(v)
    norm = math.sqrt(16 + 81)
    assert score[0].tolist() == pytest.approx([-4 / norm, 0.0, -9 / norm])
    assert score.argsort(dim=-1, descending=True).tolist() == [[1, 0, 2]]


def test_duca_kv_norm_bonus_demotes_a_negative_cell_best():
    score = torch.tensor([[-0.5, -0.1, -0.15, -0.3]])  # one 2×2 cell
    counter = torch.zeros(1, 4, dtype=torch.int)
    fresh, counter = duca_kv_norm_choose(score, counter, fresh_threshold=3, topk=1)
    assert fresh.tolist() == [[2]]  # token 1 (−0.1) gets + 0.8·(−0.1) = −0.18 < −0.15
    assert counter.tolist() == [[1, 1, 0, 1]]
    fresh, _ = duca_kv_norm_choose(score, torch.tensor([[0, 0, 0, 6]], dtype=torch.int), 3, 1)
    assert fresh.tolist() == [[3]]  # + 0.25·6/3 = 0.5 on a stale token


# ------------------------------------------------------------------------------------------- Δ-DiT


def test_delta_dit_plan():
    plan = delta_dit_plan(20, 28, boundary=10, front_blocks=21, rear_blocks=21, interval=2)
    assert plan[0] is None and plan[1] == (7, 27) and plan[9] == (7, 27) and plan[11] == (0, 20)
    assert sum(p is None for p in plan) == 10
    cached = sum(e - s + 1 for p in plan if p for s, e in [p])
    assert 20 * 28 / (20 * 28 - cached) == pytest.approx(1.6)  # the paper's 1.6× on 20 steps
