"""Quality metrics against independent references: closed forms, brute force, torch-fidelity, skimage."""
from __future__ import annotations

import hashlib
import json
import os
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tokencache  # noqa: F401  (torchvision/torch-fidelity importable on CPU torch)
from conftest_metrics_helpers import (
    brute_force_precision_recall,
    digits_evaluator_path,
    torch_threads,
    write_random_inception_weights,
)
from tokencache.data.digits import digits_to_uint8, load_digits_dataset
from tokencache.data.npz import load_samples_npz, save_samples_npz, sha256_file
from tokencache.metrics import fid as fid_module
from tokencache.metrics import (
    evaluate_quality,
    extract_features,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
    psnr,
    ssim,
)
from tokencache.metrics.reference import load_reference_batch, save_reference_batch



@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def _random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or 2 * d))
    return a @ a.T / a.shape[1]


# --- Fréchet distance ---------------------------------------------------------------------------


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_eigendecomposition_and_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(1)
    d = 20
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    # Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix: eigh only.
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(expected, rel=1e-9)
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-9)


@pytest.mark.parametrize("n, dim, ref_rank", [(8, 256, 256), (8, 256, 15), (40, 64, 64), (64, 64, 30)])
def test_fewer_samples_than_dimensions_take_the_gram_identity_and_agree_with_adm(n, dim, ref_rank):
    """N ≤ D: the N × N Gram identity gives ADM's scipy.linalg.sqrtm value to float rounding, also
    against a rank-deficient reference covariance (the rehearsal's 16-image reference batch)."""
    from tokencache.metrics.fid import frechet_distance_of_features

    rng = np.random.default_rng(n + dim + ref_rank)
    feats = rng.normal(size=(n, dim)) * rng.uniform(0.2, 2.0, size=dim) + rng.normal(size=dim)
    ref = rng.normal(size=(ref_rank + 1, dim)) + 0.3
    mu_ref, sigma_ref = feature_statistics(ref)
    value, root = frechet_distance_of_features(feats, mu_ref, sigma_ref)
    adm, adm_root = frechet_distance_of_features(feats, mu_ref, sigma_ref, sqrtm="scipy")
    assert (root, adm_root) == ("gram", "scipy")
    assert adm == pytest.approx(frechet_distance(*feature_statistics(feats), mu_ref, sigma_ref), rel=0, abs=0)
    assert value == pytest.approx(adm, rel=1e-6)


def test_samples_that_span_the_features_take_adms_sqrtm():
    from tokencache.metrics.fid import frechet_distance_of_features

    rng = np.random.default_rng(5)
    feats, ref = rng.normal(size=(65, 64)), rng.normal(size=(100, 64))
    mu_ref, sigma_ref = feature_statistics(ref)
    value, root = frechet_distance_of_features(feats, mu_ref, sigma_ref)
    assert root == "scipy"
    assert value == frechet_distance(*feature_statistics(feats), mu_ref, sigma_ref)
    with pytest.raises(ValueError, match="sqrtm must be"):
        frechet_distance_of_features(feats, mu_ref, sigma_ref, sqrtm="schur")


def test_frechet_distance_of_identical_statistics_is_zero():
    rng = np.random.default_rng(2)
    mu, sigma = feature_statistics(rng.normal(size=(200, 16)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_frechet_distance_fallback_adds_eps_to_both_diagonals(monkeypatch):
    """When sqrtm is not finite ADM retries with eps on the diagonals: check the retried value."""
    real_sqrtm = fid_module._sqrtm
    calls = []

    def failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.inf) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(fid_module, "_sqrtm", failing_once)
    s1, s2 = np.array([1.0, 0.0, 2.0]), np.array([0.0, 3.0, 2.0])  # singular covariances
    eps = 1e-6
    with pytest.warns(UserWarning, match="singular"):
        value = frechet_distance(np.zeros(3), np.diag(s1), np.ones(3), np.diag(s2), eps=eps)
    expected = 3.0 + np.sum(s1 + s2 - 2 * np.sqrt((s1 + eps) * (s2 + eps)))
    assert len(calls) == 2 and value == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_on_rank_deficient_covariances_is_finite():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 40)), rng.normal(size=(5, 40)) + 0.5  # 5 samples in 40 dimensions
    value = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert np.isfinite(value) and value > 0


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_is_float64_unbiased_covariance():
    feats = np.random.default_rng(4).normal(size=(50, 3)).astype(np.float32)
    mu, sigma = feature_statistics(feats)
    centred = feats.astype(np.float64) - feats.astype(np.float64).mean(0)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)


# --- Inception score ----------------------------------------------------------------------------


def test_inception_score_balanced_one_hot_equals_number_of_classes():
    probs = np.eye(7)[np.arange(70) % 7]
    assert inception_score(probs) == pytest.approx(7.0, rel=1e-12)


def test_inception_score_identical_predictions_is_one():
    probs = np.tile(np.array([[0.2, 0.5, 0.3]]), (40, 1))
    assert inception_score(probs) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_splits_in_order_without_shuffling():
    one_hot = np.eye(2)
    interleaved = one_hot[[0, 0, 1, 1, 0, 0, 1, 1]]  # each split of 4 balanced: score 2 per split
    blocked = one_hot[[0, 0, 0, 0, 1, 1, 1, 1]]  # each split a single class: score 1 per split
    assert inception_score(interleaved, split_size=4) == pytest.approx(2.0)
    assert inception_score(blocked, split_size=4) == pytest.approx(1.0)
    assert inception_score(blocked, split_size=8) == pytest.approx(2.0)


def test_inception_score_matches_hand_loop_with_partial_last_split():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(23, 5)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for start in (0, 10, 20):
        part = probs[start : start + 10]
        py = part.mean(0)
        kl = [sum(p[j] * np.log(p[j] / py[j]) for j in range(5)) for p in part]
        scores.append(np.exp(np.mean(kl)))
    assert inception_score(probs, split_size=10) == pytest.approx(np.mean(scores), rel=1e-12)


# --- precision / recall -------------------------------------------------------------------------


def test_precision_recall_identical_sets_is_one():
    feats = np.random.default_rng(6).normal(size=(30, 4))
    assert precision_recall(feats, feats, k=3) == (1.0, 1.0)


def test_precision_recall_far_apart_sets_is_zero():
    rng = np.random.default_rng(7)
    assert precision_recall(rng.normal(size=(20, 4)), rng.normal(size=(20, 4)) + 100.0) == (0.0, 0.0)


def test_precision_recall_one_dimensional_hand_example_k1():
    # ref {-5, 0, 1, 3}: squared radii (k=1) 25, 1, 1, 4. samples {0.5, 2.9, 10, 6}: 5.76, 5.76, 16, 9.61.
    # precision: 0.5 (in 0's ball), 2.9 (in 3's ball) -> 2/4. recall: 0, 1, 3 covered, -5 not -> 3/4.
    ref = np.array([[-5.0], [0.0], [1.0], [3.0]])
    smp = np.array([[0.5], [2.9], [10.0], [6.0]])
    assert precision_recall(ref, smp, k=1) == pytest.approx((0.5, 0.75))


def test_precision_recall_boundary_counts_as_inside():
    # ref {0, 2}: squared radius 4 each (k=1); sample 4 is at squared distance 4 from 2: inside (<=).
    ref, smp = np.array([[0.0], [2.0]]), np.array([[4.0], [100.0]])
    assert precision_recall(ref, smp, k=1)[0] == 0.5


def test_precision_recall_batched_equals_brute_force():
    rng = np.random.default_rng(8)
    ref = rng.normal(size=(37, 5))
    smp = rng.normal(size=(29, 5)) * 0.6 + 0.8
    expected = brute_force_precision_recall(ref, smp, k=3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(ref, smp, k=3, row_batch_size=7, col_batch_size=5) == pytest.approx(expected)
    assert precision_recall(ref, smp, k=3) == pytest.approx(expected)


def test_manifold_radius_is_kth_neighbour_excluding_self():
    points = np.array([[0.0], [1.0], [3.0], [7.0]])
    radii = fid_module.manifold_radii(points, k=2, row_batch_size=3, col_batch_size=2)
    np.testing.assert_allclose(radii.numpy(), [9.0, 4.0, 9.0, 36.0])


# --- Inception features (random weights, no network) --------------------------------------------


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth")


@pytest.fixture(scope="module")
def inception(inception_weights):
    from tokencache.metrics.features import load_extractor

    return load_extractor("inception", inception_weights, device="cpu")


@pytest.fixture(scope="module")
def tiny_images():
    return np.random.default_rng(9).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def inception_features(inception, tiny_images):
    return extract_features(tiny_images, inception, batch_size=2, progress=False)


def _manual_inception(net, images_nhwc):
    """torch-fidelity's Inception-v3 run layer by layer, with Mixed_6d.branch1x1 done by hand."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).float()
    x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    x = (x - 128) / 128
    stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
            "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"]
    for name in stem:
        x = getattr(net, name)(x)
    b = net.Mixed_6d.branch1x1
    conv = F.conv2d(x, b.conv.weight)
    mixed_6_conv = F.relu(F.batch_norm(conv, b.bn.running_mean, b.bn.running_var, b.bn.weight, b.bn.bias, False, 0.0, b.bn.eps))
    for name in ["Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]:
        x = getattr(net, name)(x)
    pool = x.mean(dim=(2, 3))
    return mixed_6_conv, pool, pool @ net.fc.weight.T


def test_inception_feature_shapes(inception_features):
    assert inception_features["pool"].shape == (3, 2048)
    assert inception_features["spatial"].shape == (3, 17 * 17 * 7)
    assert inception_features["logits"].shape == (3, 1008)
    np.testing.assert_allclose(inception_features["probs"].sum(1), 1.0, rtol=1e-5)


@torch.no_grad()
def test_inception_taps_match_a_layer_by_layer_computation(inception, tiny_images, inception_features):
    mixed_6_conv, pool, logits_unbiased = _manual_inception(inception.module.net, tiny_images)
    assert mixed_6_conv.shape == (3, 192, 17, 17)
    spatial = mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(3, -1)  # ADM: NHWC [..., :7], flattened
    assert float(spatial.abs().max()) > 0
    np.testing.assert_allclose(inception_features["spatial"], spatial.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(inception_features["pool"], pool.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(inception_features["logits"], logits_unbiased.numpy(), rtol=1e-4, atol=1e-4)


def test_inception_grey_images_are_repeated_to_rgb(inception):
    grey = np.random.default_rng(10).integers(0, 256, size=(1, 8, 8, 1), dtype=np.uint8)
    a = extract_features(grey, inception, progress=False)
    b = extract_features(np.repeat(grey, 3, axis=-1), inception, progress=False)
    np.testing.assert_array_equal(a["pool"], b["pool"])


def test_inception_identity_records_weights_file(inception, inception_weights):
    assert inception.identity["weights_sha256"] == hashlib.sha256(open(inception_weights, "rb").read()).hexdigest()
    assert inception.identity["weights"] == os.path.abspath(inception_weights)


def test_missing_inception_weights_offline_raises_actionable_error(monkeypatch, tmp_path):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    from tokencache.metrics.features import INCEPTION_WEIGHTS_ENV, InceptionWeightsUnavailable, load_extractor

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsUnavailable, match=INCEPTION_WEIGHTS_ENV) as info:
        load_extractor("inception", device="cpu")
    assert isinstance(info.value, RuntimeError) and "\n" not in str(info.value)
    assert tf_inception.URL_INCEPTION_V3 in str(info.value)


def test_extract_features_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        extract_features(np.zeros((2, 8, 8, 3), np.float32), "digits")


# --- PSNR / SSIM --------------------------------------------------------------------------------


def test_psnr_matches_hand_formula():
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-20, 21, size=x.shape), 0, 255).astype(np.uint8)
    per_image = [10 * np.log10(255.0**2 / np.mean((a.astype(float) - b.astype(float)) ** 2)) for a, b in zip(x, y)]
    np.testing.assert_allclose(psnr(x, y, per_image=True), per_image, rtol=1e-12)
    assert psnr(x, y) == pytest.approx(np.mean(per_image), rel=1e-12)


def test_psnr_of_identical_images_is_capped_not_infinite():
    """An image equal to its twin scores the PSNR of the smallest uint8 error (one value off by one),
    so one identical image among 200 (DiT DDPM-40 l2c) no longer makes the run's mean infinite."""
    from tokencache.metrics.fidelity import identical, psnr_cap

    rng = np.random.default_rng(13)
    x = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    y = x.copy()
    y[1:, 0, 0, 0] ^= 8  # images 1-4 differ in one value; image 0 is identical
    cap = psnr_cap(8 * 8 * 3)
    assert cap == pytest.approx(10 * np.log10(255.0**2 * 192)) and cap == pytest.approx(70.9638, abs=1e-4)
    values = psnr(x, y, per_image=True)
    assert values[0] == cap and np.all(values[1:] < cap) and np.isfinite(psnr(x, y))
    assert psnr(x, x) == pytest.approx(cap) and identical(x, y) == 1 and identical(x, x) == 5
    one_level = x.copy()
    one_level[0, 0, 0, 0] = x[0, 0, 0, 0] ^ 1 if x[0, 0, 0, 0] % 2 == 0 else x[0, 0, 0, 0] - 1
    assert psnr(x[:1], one_level[:1]) == pytest.approx(cap)  # the cap is the smallest possible error's PSNR


@pytest.mark.parametrize("size", [32, 8])
def test_ssim_matches_skimage(size):
    skimage_metrics = pytest.importorskip("skimage.metrics")
    from tokencache.metrics.fidelity import ssim_window

    rng = np.random.default_rng(12)
    x = rng.integers(0, 256, size=(3, size, size, 3), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 41, size=x.shape), 0, 255).astype(np.uint8)
    window, sigma = ssim_window(size, size)
    assert (window, sigma) == ((11, 1.5) if size >= 11 else (7, 1.5 * 7 / 11))
    expected = [
        skimage_metrics.structural_similarity(
            a, b, gaussian_weights=True, sigma=sigma, use_sample_covariance=False, data_range=255, channel_axis=-1
        )
        for a, b in zip(x, y)
    ]
    np.testing.assert_allclose(ssim(x, y, per_image=True), expected, rtol=1e-10)
    assert ssim(x, x) == pytest.approx(1.0)


# --- npz ----------------------------------------------------------------------------------------


def test_samples_npz_round_trip(tmp_path):
    rng = np.random.default_rng(13)
    images = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5)
    save_samples_npz(tmp_path / "s.npz", images, labels)
    got_images, got_labels = load_samples_npz(tmp_path / "s.npz")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    with np.load(tmp_path / "s.npz") as raw:
        assert sorted(raw.files) == ["arr_0", "arr_1"] and raw["arr_0"].dtype == np.uint8
    save_samples_npz(tmp_path / "unlabelled.npz", images)
    assert load_samples_npz(tmp_path / "unlabelled.npz")[1] is None
    assert sorted(os.listdir(tmp_path)) == ["s.npz", "unlabelled.npz"]  # no temporary files left


def test_samples_npz_write_is_atomic(tmp_path, monkeypatch):
    images = np.zeros((2, 8, 8, 3), np.uint8)
    save_samples_npz(tmp_path / "s.npz", images)
    before = (tmp_path / "s.npz").read_bytes()

    def crash(file, array, **kwargs):
        file.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np.lib.format, "write_array", crash)
    with pytest.raises(KeyboardInterrupt):
        save_samples_npz(tmp_path / "s.npz", images + 1)
    assert (tmp_path / "s.npz").read_bytes() == before
    assert os.listdir(tmp_path) == ["s.npz"]


def test_sha256_file(tmp_path):
    (tmp_path / "f").write_bytes(b"tokencache" * 1000)
    assert sha256_file(tmp_path / "f", chunk_size=7) == hashlib.sha256(b"tokencache" * 1000).hexdigest()


# --- evaluate_quality on the digits testbed -----------------------------------------------------


@pytest.fixture(scope="module")
def digits_test():
    split = load_digits_dataset("test")
    return digits_to_uint8(split.images), split.labels.numpy()


def test_reference_batch_statistics_match_features(tmp_path, digits_test):
    images, _ = digits_test
    stats = save_reference_batch(tmp_path / "ref.npz", images, extractor="digits", weights_path=digits_evaluator_path())
    ref = load_reference_batch(tmp_path / "ref.npz")
    assert set(ref) == {"mu", "sigma", "mu_s", "sigma_s", "arr_0", "extractor"} and ref["extractor"] == "digits"
    feats = extract_features(images, "digits", weights_path=digits_evaluator_path(), device="cpu", progress=False)
    mu, sigma = feature_statistics(feats["pool"])
    np.testing.assert_allclose(ref["mu"], mu)
    np.testing.assert_allclose(ref["sigma"], sigma)
    np.testing.assert_allclose(ref["sigma_s"], stats["sigma_s"])
    np.testing.assert_array_equal(ref["arr_0"], images)


def test_evaluate_quality_digits_test_split_against_itself(tmp_path, digits_test):
    images, labels = digits_test
    save_samples_npz(tmp_path / "test.npz", images, labels)
    result = evaluate_quality(tmp_path / "test.npz", tmp_path / "test.npz", features="digits",
                              weights_path=digits_evaluator_path(), device="cpu")
    ref_mu, ref_sigma = feature_statistics(
        extract_features(images, "digits", weights_path=digits_evaluator_path(), device="cpu", progress=False)["pool"]
    )
    assert abs(result["fid"]) < 1e-6 * np.trace(ref_sigma)
    assert abs(result["sfid"]) < 1e-6
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert result["num_samples"] == result["num_reference"] == len(images) == 450
    assert result["fid_label"] == "FID-450" and result["proxy"] is True
    assert result["reference_sha256"] == sha256_file(tmp_path / "test.npz")
    assert result["extractor"]["weights_sha256"] == sha256_file(digits_evaluator_path())
    assert result["class_consistency"] == pytest.approx(result["extractor"]["test_accuracy"])
    assert 1.0 < result["inception_score"] <= 10.0
    json.dumps(result, allow_nan=False)


def test_evaluate_quality_uses_reference_statistics_from_npz(tmp_path, digits_test):
    images, _ = digits_test
    save_reference_batch(tmp_path / "ref.npz", images, extractor="digits", weights_path=digits_evaluator_path())
    train = digits_to_uint8(load_digits_dataset("train").images)
    result = evaluate_quality(train, tmp_path / "ref.npz", features="digits", weights_path=digits_evaluator_path(), device="cpu")
    assert result["reference_stats_from"] == "npz" and result["fid_label"] == "FID-1347"
    assert result["fid"] > 0 and 0 < result["precision"] <= 1 and 0 < result["recall"] <= 1
    assert "class_consistency" not in result  # no labels given


def test_evaluate_quality_refuses_reference_of_another_extractor(tmp_path, digits_test):
    images, _ = digits_test
    save_reference_batch(tmp_path / "ref.npz", images, extractor="digits", weights_path=digits_evaluator_path())
    with pytest.raises(ValueError, match="features='digits'"):
        evaluate_quality(images, tmp_path / "ref.npz", features="inception")


def test_sample_count_labels():
    from tokencache.metrics.quality import sample_count_label

    assert [sample_count_label(n) for n in (50_000, 5_000, 450, 1_500)] == ["50K", "5K", "450", "1500"]


def test_reference_features_extracted_once_give_the_same_metrics(tmp_path):
    """`tokencache reference-features` then `evaluate --reference-features`: the same record as extracting
    the reference images' features in the evaluation; another reference batch or extractor is refused."""
    from tokencache.data.digits import digits_to_uint8, load_digits_dataset
    from tokencache.data.npz import save_samples_npz
    from tokencache.metrics.features import load_extractor
    from tokencache.metrics.quality import evaluate_run
    from tokencache.metrics.reference import (ReferenceFeaturesMismatch, save_reference_batch,
                                              save_reference_features)
    from tokencache.weights import shipped_path

    weights, reference = shipped_path("digits-evaluator"), shipped_path("digits-reference")
    data = load_digits_dataset("test")
    samples = tmp_path / "samples.npz"
    save_samples_npz(samples, digits_to_uint8(data.images[:40]), data.labels[:40])
    extractor = load_extractor("digits", weights, "cpu")
    features = tmp_path / "reference_features.npz"
    info = save_reference_features(features, reference, extractor)
    assert info["images"] > 40 and info["pool_dim"] == 128

    def record(**kw):
        out = evaluate_run(samples, reference, features="digits", weights_path=weights, bootstrap=20, **kw)
        out["bootstrap"].pop("seconds")  # timings differ
        return {k: v for k, v in out.items() if k != "provenance"}

    assert record(reference_features=features) == record()
    other = tmp_path / "other_reference.npz"
    save_reference_batch(other, digits_to_uint8(data.images[:30]), extractor="digits", weights_path=weights)
    with pytest.raises(ReferenceFeaturesMismatch, match="another reference sha256"):
        evaluate_run(samples, other, features="digits", weights_path=weights, reference_features=features)
