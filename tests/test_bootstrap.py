"""Bootstrap intervals: every vectorised resample equals the metric recomputed on that resample."""
import numpy as np
import pytest

from tokencache.metrics import bootstrap as bs
from tokencache.metrics.fid import feature_statistics, frechet_distance, inception_score, precision_recall


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(0)
    ref = (rng.normal(size=(90, 12)) ** 2).astype(np.float32)
    smp = ((rng.normal(size=(40, 12)) * 1.2 + 0.1) ** 2).astype(np.float32)
    probs = rng.dirichlet(np.ones(10) * 0.4, size=40)
    return ref, smp, probs


def test_index_sets_depend_only_on_seed_size_and_count():
    a, b = bs.resample_indices(50, 20, 3), bs.resample_indices(50, 20, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, bs.resample_indices(50, 20, 4))
    assert not np.array_equal(a[:, :40], bs.resample_indices(40, 20, 3))
    counts = bs.index_counts(a, 50)
    assert counts.shape == (20, 50) and (counts.sum(axis=1) == 50).all()
    assert np.array_equal(counts[7], np.bincount(a[7], minlength=50))
    assert bs.indices_digest(a) == bs.indices_digest(b)
    with pytest.raises(ValueError, match="at least 2"):
        bs.resample_indices(1, 10)


def test_resampled_values_equal_the_metrics_of_the_resampled_sets(features):
    ref, smp, probs = features
    n = len(smp)
    idx = bs.resample_indices(n, 6, 0)
    counts = bs.index_counts(idx, n)
    mu_r, sigma_r = feature_statistics(ref)
    fids = bs.frechet_values(smp, counts, mu_r, sigma_r)
    precision, recall = bs.precision_recall_values(ref, smp, counts)
    scores = bs.inception_score_values(probs, idx, counts)
    kids = bs.kid_values(smp, ref, counts)
    for b, rows in enumerate(idx):
        mu, sigma = feature_statistics(smp[rows])
        assert fids[b] == pytest.approx(frechet_distance(mu, sigma, mu_r, sigma_r), rel=1e-7)
        p, r = precision_recall(ref, smp[rows])
        assert (precision[b], recall[b]) == pytest.approx((p, r), abs=1e-12)
        assert scores[b] == pytest.approx(inception_score(probs[rows]), rel=1e-10)
        assert kids[b] == pytest.approx(bs.kid(smp[rows], ref), rel=1e-9)  # clean-fid's own estimate
    # the identity resample gives the point estimates
    ones = np.ones((1, n))
    assert bs.frechet_values(smp, ones, mu_r, sigma_r)[0] == pytest.approx(
        frechet_distance(*feature_statistics(smp), mu_r, sigma_r), rel=1e-8)
    assert bs.kid_values(smp, ref, ones)[0] == pytest.approx(bs.kid(smp, ref), rel=1e-9)


def test_recall_radii_beyond_the_nearest_neighbours(features, monkeypatch):
    """With too few sorted neighbours searched first, the radii come from all of them: the same recall."""
    ref, smp, _ = features
    counts = bs.index_counts(bs.resample_indices(len(smp), 8, 1), len(smp))
    expected = bs.precision_recall_values(ref, smp, counts)[1]
    monkeypatch.setattr(bs, "NEAREST", 2)
    np.testing.assert_array_equal(bs.precision_recall_values(ref, smp, counts)[1], expected)


def test_large_sets_take_the_per_resample_path(features, monkeypatch):
    """Above OUTER_LIMIT (Inception features of 50,000 samples) the second moments are one product per
    resample instead of one product with all outer products: the same values."""
    ref, smp, _ = features
    mu_r, sigma_r = feature_statistics(ref)
    counts = bs.index_counts(bs.resample_indices(len(smp), 5, 0), len(smp))
    fast = bs.frechet_values(smp, counts, mu_r, sigma_r)
    monkeypatch.setattr(bs, "OUTER_LIMIT", 0)
    np.testing.assert_allclose(bs.frechet_values(smp, counts, mu_r, sigma_r), fast, rtol=1e-10)


@pytest.mark.parametrize("n, dim, ref_rank", [(8, 64, 64), (8, 64, 15), (30, 32, 32)])
def test_fewer_samples_than_dimensions_take_the_gram_form(n, dim, ref_rank):
    """N ≤ D (a proxy FID on Inception features): the N × N Gram form gives the basis form's values, and
    each resample's value is the Fréchet distance of the resampled set."""
    rng = np.random.default_rng(n + ref_rank)
    smp = rng.normal(size=(n, dim)) * rng.uniform(0.3, 2.0, size=dim) + 0.5
    mu_r, sigma_r = feature_statistics(rng.normal(size=(ref_rank + 1, dim)))
    idx = bs.resample_indices(n, 40, 3)
    counts = bs.index_counts(idx, n)
    gram = bs.frechet_values(smp, counts, mu_r, sigma_r)
    np.testing.assert_allclose(gram, bs.frechet_values(smp, counts, mu_r, sigma_r, method="gram"), rtol=0)
    np.testing.assert_allclose(gram, bs.frechet_values(smp, counts, mu_r, sigma_r, method="basis"), rtol=1e-8)
    for b in (0, 7):
        rows = idx[b]
        assert gram[b] == pytest.approx(frechet_distance(*feature_statistics(smp[rows]), mu_r, sigma_r), rel=1e-6)
    with pytest.raises(ValueError, match="method"):
        bs.frechet_values(smp, counts, mu_r, sigma_r, method="schur")


def test_kid_is_clean_fids_and_seeded(features):
    from cleanfid.fid import kernel_distance

    ref, smp, _ = features
    state = np.random.get_state()
    np.random.seed(bs.KID_SEED)
    expected = kernel_distance(smp.astype(np.float64), ref.astype(np.float64), num_subsets=bs.KID_SUBSETS,
                               max_subset_size=bs.KID_MAX_SUBSET)
    np.random.set_state(state)
    before = np.random.get_state()[1].copy()
    assert bs.kid(smp, ref) == pytest.approx(expected, rel=1e-12) == bs.kid(smp, ref)
    assert np.array_equal(np.random.get_state()[1], before)  # the caller's RNG is left alone


def test_kid_repeats_when_evaluations_run_in_threads(features):
    """The workflow evaluates runs in threads of one process; clean-fid's global RNG must not mix
    their KID subsets (it did: KID moved by 2% between two identical workflow runs)."""
    from concurrent.futures import ThreadPoolExecutor

    ref, smp, _ = features
    expected = bs.kid(smp, ref)
    with ThreadPoolExecutor(4) as pool:
        values = list(pool.map(lambda _: bs.kid(smp, ref), range(24)))
    assert values == [expected] * 24


def test_intervals_are_recentred_and_paired_ones_are_narrower():
    rng = np.random.default_rng(1)
    shared = rng.normal(size=1000) * 2.0
    a, b = 10 + shared + rng.normal(size=1000) * 0.1, 11 + shared + rng.normal(size=1000) * 0.1
    low, high = bs.interval(a + 5.0, 10.0)  # values shifted up by 5: the interval is put back around 10
    assert low < 10.0 < high and bs.resampling_bias(a + 5.0, 10.0) == pytest.approx(5.0, abs=0.3)
    paired = bs.paired_interval(a, b, point=-1.0)
    assert paired[0] < -1.0 < paired[1] and paired[1] < 0  # resolved
    assert paired[1] - paired[0] < 0.2 * (high - low)  # the shared variation cancels
    assert bs.paired_interval(a, a) == [0.0, 0.0]


@pytest.mark.slow
def test_evaluate_run_reports_intervals_kid_provenance(tmp_path):
    from tokencache.data.digits import digits_to_uint8, load_digits_dataset
    from tokencache.data.npz import save_samples_npz
    from tokencache.metrics.quality import evaluate_run
    from tokencache.weights import shipped_path

    digits = load_digits_dataset("train")
    images = digits_to_uint8(digits.images[:60])
    save_samples_npz(tmp_path / "a.npz", images, digits.labels[:60].numpy())
    twin = images.copy()
    twin[:30, 0, 0, :] ^= 16
    save_samples_npz(tmp_path / "b.npz", twin, digits.labels[:60].numpy())
    result = evaluate_run(tmp_path / "b.npz", shipped_path("digits-reference"), features="digits",
                          weights_path=shipped_path("digits-evaluator"), fidelity_to=tmp_path / "a.npz",
                          bootstrap=50, bootstrap_out=tmp_path / "b.bootstrap.npz")
    assert result["identical_to_full"] == 30 and np.isfinite(result["psnr_to_full"])
    for name in ("fid", "sfid", "inception_score", "precision", "recall", "kid", "class_consistency",
                 "psnr_to_full", "ssim_to_full"):
        low, high = result["ci95"][name]
        assert low <= result[name] <= high, name
    assert result["kid_settings"]["subset_size"] == 60 and result["bootstrap"]["resamples"] == 50
    assert result["provenance"]["cpu_capability"] and result["provenance"]["torch"]
    with np.load(tmp_path / "b.bootstrap.npz") as data:
        assert data["values_fid"].shape == (50,) and str(data["indices_sha256"]) == result["bootstrap"]["indices_sha256"]
