"""evaluations/evaluator.py: each ADM formula against a plain numpy/scipy recomputation or a closed form, the
streaming .npz reader, input errors, evaluate() end to end and the CLI's output."""
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch

from evaluations import evaluator
from evaluations.evaluator import (NpzArrayReader, compute_statistics, evaluate, frechet_distance, inception_score,
                                   open_images, precision_recall, read_statistics, squared_distances)
from evaluations.inception import NUM_CLASSES, POOL_DIM, SPATIAL_DIM, InceptionFeatures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tolerances follow from the dtype (float32 eps = 1.19e-7, float64 eps = 2.2e-16), the magnitudes and the number of
# roundings: float32 results differ in their last bits from one CPU to another (BLAS kernels, summation order).
EPS32, EPS64 = float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)


#################################################################################
#                                Inception Score                                #
#################################################################################

def inception_score_reference(probs: np.ndarray, split_size: int) -> float:
    """exp(E_x KL(p(y|x) || p(y))) per consecutive split, in float64 with explicit loops; mean over splits."""
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size].astype(np.float64)
        marginal = part.mean(axis=0)
        kls = []
        for row in part:
            kls.append(sum(p * np.log(p / q) for p, q in zip(row, marginal) if p > 0))
        scores.append(np.exp(np.mean(kls)))
    return float(np.mean(scores))


def test_inception_score_matches_numpy_recomputation():
    logits = np.random.default_rng(0).normal(0, 3, (23, 10))
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    # ADM's IS runs in float32: per row, KL = sum_c p (log p - log q) has error <~ eps sum_c p (|log p| + |log q| + 3)
    # <~ 10 eps here (entropies and cross-entropies of a few nats), and exp turns that absolute error of the mean KL
    # into the same relative error of IS: rel = 84 eps = 1e-5 leaves room (measured: 1.4e-7).
    for split in (5, 23):  # 5: four full splits and a last one of 3
        assert inception_score(probs, split) == pytest.approx(inception_score_reference(probs, split), rel=1e-5)


def test_inception_score_of_uniform_and_one_hot_predictions():
    # float32: the marginal of 6 equal rows is p within 2 ulps, so log p - log q is 0 up to 2 eps plus the two logs'
    # roundings (ulp(6.9) / 2 each): <= 7.2e-7 per class, weighted by p and summed (sum p = 1), then exp:
    # IS = 1 within 8e-7 at worst: abs=2e-6 (any real error in the formula moves IS by O(1)).
    assert inception_score(np.full((12, NUM_CLASSES), 1 / NUM_CLASSES, np.float32), 6) == pytest.approx(1.0, abs=2e-6)
    one_hot = np.eye(4, dtype=np.float32)[np.arange(12) % 4]   # every class equally often, exact zeros elsewhere
    # KL = -log 0.25 exactly up to float32 roundings of the log, the mean and exp: <~ 4 eps = 5e-7 relative.
    assert inception_score(one_hot, 12) == pytest.approx(4.0, rel=1e-6)


def test_inception_score_splits_are_consecutive_and_not_shuffled():
    class_sorted = np.eye(2, dtype=np.float32)[np.repeat([0, 1], 6)]
    # Exact: a single-class split has marginal = p, KL = 0, IS = exp(0) = 1. Mixed: log 0.5 and exp in float32,
    # <~ 3 eps = 4e-7 relative, inside approx's default rel=1e-6.
    assert inception_score(class_sorted, 6) == pytest.approx(1.0)   # each split holds a single class
    assert inception_score(class_sorted, 12) == pytest.approx(2.0)


def test_inception_score_needs_one_full_split():
    with pytest.raises(ValueError, match="at least one split of 10 samples, got 9"):
        inception_score(np.full((9, 3), 1 / 3, np.float32), 10)


#################################################################################
#                                  FID / sFID                                   #
#################################################################################

def fid_reference(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), via symmetric eigendecompositions."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    diff = np.asarray(mu1, np.float64) - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def fid_tolerance(mu1, mu2, expected, float64_rel=1e-9) -> float:
    """Absolute tolerance of an ADM FID against a float64 recomputation. ADM takes the mean difference in float32
    (the means' dtype): rounding each of the d components costs <= eps32 relative on its square, and the float32
    dot product (d products, d - 1 additions) <= d eps32 / 2 of sum diff^2 in any summation order, so
    (d + 1) eps32 |mu1 - mu2|^2 bounds it; the covariance part is float64 (sqrtm vs eigendecompositions), within
    float64_rel of the value."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return (len(diff) + 1) * EPS32 * float(diff @ diff) + float64_rel * abs(expected)


def test_compute_statistics_is_float32_mean_and_unbiased_covariance():
    acts = np.random.default_rng(1).normal(size=(50, 6)).astype(np.float32)
    mu, sigma = compute_statistics(acts)
    assert mu.dtype == np.float32 and sigma.dtype == np.float64
    centered = acts.astype(np.float64) - acts.astype(np.float64).mean(0)
    # mu: a float32 mean of n = 50 values is within (n - 1) eps32 / 2 * mean|x| + ulp/2 of the exact one in any
    # summation order; the means are small (0.07 .. 0.44) against |x| ~ 0.7, so the bound is absolute:
    # n eps32 mean|x| = 4.3e-6 (dividing by n - 1 instead would be off by mu / 49 >= 1.4e-3).
    np.testing.assert_allclose(mu, acts.astype(np.float64).mean(0), rtol=0,
                               atol=len(acts) * EPS32 * float(np.abs(acts).mean()))
    # sigma: float64 sums of 50 products of O(1) values on both sides: <= 50 eps64 max|x|^2 = 1e-13 absolute.
    np.testing.assert_allclose(sigma, centered.T @ centered / 49, rtol=1e-10,
                               atol=len(acts) * EPS64 * float(np.abs(acts).max()) ** 2)


def test_fid_of_identical_sets_is_zero():
    mu, sigma = compute_statistics(np.random.default_rng(2).normal(size=(200, 16)).astype(np.float32))
    # The mean term is exactly 0; 2 tr(S) - 2 tr(sqrtm(S S)) in float64 with tr(S) ~ 16 and cond(S) < 10 is
    # ~1e-13 off 0; 1e-8 leaves room (a missing factor 2 would give ~16).
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fid_of_two_gaussians_matches_closed_form():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    var1, var2 = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    # float64 means and diagonal covariances: sums of 8 terms, ~10 eps64 relative; rel=1e-10.
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(closed_form, rel=1e-10)
    # full covariances (the statistics of real activations), against the symmetric eigendecomposition route
    mu1, sigma1 = compute_statistics(rng.normal(size=(300, 12)).astype(np.float32))
    mu2, sigma2 = compute_statistics((rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) + 1).astype(np.float32))
    # Here the means are float32 (as ADM's are): the mean term |mu1 - mu2|^2 = 11.4 is good to (d + 1) eps32,
    # 1.8e-5 (1.5e-7 of the FID, 117); the float64 matrix square roots (cond(S2) ~ 2000) to ~1e-12 relative.
    expected = fid_reference(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(
        expected, rel=0, abs=fid_tolerance(mu1, mu2, expected, float64_rel=1e-8))


def test_fid_retries_with_eps_on_both_covariances_when_sqrtm_is_not_finite(monkeypatch):
    rng = np.random.default_rng(4)
    mu1, sigma1 = compute_statistics(rng.normal(size=(40, 5)).astype(np.float32))
    mu2, sigma2 = compute_statistics(rng.normal(size=(40, 5)).astype(np.float32))
    calls = []

    def sqrtm_failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else scipy.linalg.sqrtm(matrix)

    monkeypatch.setattr(evaluator, "_sqrtm", sqrtm_failing_once)
    with pytest.warns(UserWarning, match="singular product; adding 1e-06 to diagonal"):
        fid = frechet_distance(mu1, sigma1, mu2, sigma2)
    offset = np.eye(5) * 1e-6
    product = (sigma1 + offset) @ (sigma2 + offset)
    # float64 products of 5 terms: two BLAS calls (np.dot there, @ here) may sum them in another order, <= 5 eps64
    # |S1| |S2| apart; leaving out either 1e-6 offset moves entries by ~1e-6 |S|.
    np.testing.assert_allclose(calls[1], product, rtol=0, atol=1e-12 * np.abs(product).max())
    diff = mu1.astype(np.float64) - mu2
    expected = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(scipy.linalg.sqrtm(product).real)
    # ADM's mean difference is float32: (d + 1) eps32 |mu1 - mu2|^2 = 3.4e-7 (4e-7 of the FID); the rest is the
    # same float64 sqrtm of the same matrix.
    assert fid == pytest.approx(expected, rel=0, abs=fid_tolerance(mu1, mu2, expected))


def test_fid_rejects_a_large_imaginary_component():
    # sqrtm(diag(1, -1)) = diag(1, i): imaginary diagonal 1 > atol 1e-3
    with pytest.raises(ValueError, match="Imaginary component 1.0"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]))


def test_fid_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="different lengths"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


#################################################################################
#                              Precision / recall                               #
#################################################################################

def squared_distances_fp16_reference(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """numpy float16 arithmetic as TF's GPU kernels run ADM's DistanceBlock: squares in fp16, sums and the matmul
    accumulated in fp32 and rounded to fp16, add/sub in fp16; the whole block in fp32 if anything overflows."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        norm_u = np.sum(u16 * u16, axis=1, dtype=np.float32).astype(np.float16)[:, None]
        norm_v = np.sum(v16 * v16, axis=1, dtype=np.float32).astype(np.float16)[None, :]
        dots = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        dist = np.maximum(norm_u - np.float16(2) * dots + norm_v, np.float16(0))
    if np.isfinite(dist).all():
        return dist.astype(np.float32)
    u, v = u.astype(np.float32), v.astype(np.float32)
    fp32 = (u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :]
    return np.maximum(fp32, 0)


def precision_recall_reference(ref: np.ndarray, sample: np.ndarray, k: int = 3):
    """Brute force over all pairs: radius^2 = k-th smallest distance to the own set (self included at 0th)."""
    ref_radii = np.sort(squared_distances_fp16_reference(ref, ref), axis=1)[:, k]
    sample_radii = np.sort(squared_distances_fp16_reference(sample, sample), axis=1)[:, k]
    cross = squared_distances_fp16_reference(ref, sample)
    precision = np.mean([any(cross[i, j] <= ref_radii[i] for i in range(len(ref))) for j in range(len(sample))])
    recall = np.mean([any(cross[i, j] <= sample_radii[j] for j in range(len(sample))) for i in range(len(ref))])
    return float(precision), float(recall)


def _quantized_features(rng, n, dim=16):
    # multiples of 1/8 in [0, 4]: every fp32 sum is exact, so the only rounding is the fp16 one under test
    return (rng.integers(0, 33, (n, dim)) / 8).astype(np.float32)


def test_squared_distances_emulate_adm_fp16():
    rng = np.random.default_rng(5)
    u, v = _quantized_features(rng, 9), _quantized_features(rng, 11)
    reference = squared_distances_fp16_reference(u, v)
    exact = ((u[:, None, :].astype(np.float64) - v[None]) ** 2).sum(-1)
    assert not np.array_equal(reference, exact.astype(np.float32))  # fp16 rounding changes some distances here
    np.testing.assert_array_equal(squared_distances(torch.from_numpy(u), torch.from_numpy(v)).numpy(), reference)


def test_squared_distances_fall_back_to_fp32_when_fp16_overflows():
    rng = np.random.default_rng(6)
    u, v = rng.uniform(0, 400, (5, 8)).astype(np.float32), rng.uniform(0, 400, (7, 8)).astype(np.float32)
    reference = squared_distances_fp16_reference(u, v)
    assert np.abs(u).max() ** 2 > np.finfo(np.float16).max  # the fp16 path overflows here
    # Both sides evaluate |u|^2 - 2 u.v + |v|^2 in float32 (torch's and numpy's BLAS, which sum in their own
    # orders). Each is within (D + 3) eps32 (|u| + |v|)^2 of the exact distance (D = 8 products per sum, three more
    # roundings), a cancellation that reaches ~2 for |u|, |v| ~ 650; so within twice that of each other. The fp16
    # path would be off by ~1e-3 (|u| + |v|)^2 ~ 2e3, or infinite.
    bound = 2 * (8 + 3) * EPS32 * (np.linalg.norm(u, axis=1)[:, None] + np.linalg.norm(v, axis=1)[None, :]) ** 2
    ours = squared_distances(torch.from_numpy(u), torch.from_numpy(v)).numpy()
    assert np.all(np.abs(ours - reference) <= bound), np.abs(ours - reference).max()


def test_precision_recall_matches_brute_force_with_ties():
    rng = np.random.default_rng(7)
    ref = rng.integers(0, 3, (23, 4)).astype(np.float32)      # a coarse grid: many equal distances
    sample = rng.integers(0, 3, (31, 4)).astype(np.float32) + rng.choice([0, 1.5], (31, 4)).astype(np.float32)
    expected = precision_recall_reference(ref, sample)
    for batch_size in (7, 100):  # several row/column blocks, and one
        assert precision_recall(torch.from_numpy(ref), torch.from_numpy(sample), 3, batch_size) == expected
    # The data has ties on the radius: a strict `<` would give other numbers.
    ref_radii = np.sort(squared_distances_fp16_reference(ref, ref), axis=1)[:, 3]
    cross = squared_distances_fp16_reference(ref, sample)
    assert (cross == ref_radii[:, None]).any()


def test_precision_recall_matches_brute_force_on_quantized_features():
    rng = np.random.default_rng(8)
    ref, sample = _quantized_features(rng, 20), _quantized_features(rng, 26) * 0.9
    # Exact equality: the x 0.9 features are no longer multiples of 1/8, and their float32 sums are not exact, but
    # each exact sum lies >= 2.3e-6 (relative, ~20 eps32) from an fp16 rounding boundary, more than a float32 sum
    # of 16 positive terms can move in any order (7.5 eps32): torch's and numpy's BLAS give the same fp16 values.
    expected = precision_recall_reference(ref, sample)
    assert precision_recall(torch.from_numpy(ref), torch.from_numpy(sample), 3, 8) == expected


def test_precision_recall_of_identical_and_of_far_apart_sets():
    feats = torch.from_numpy(_quantized_features(np.random.default_rng(9), 15))
    assert precision_recall(feats, feats.clone(), 3, 4) == (1.0, 1.0)
    assert precision_recall(feats, feats + 100, 3, 4) == (0.0, 0.0)


def test_a_point_on_the_radius_counts_as_inside():
    """ADM's `<=`: a reference point repeated k + 1 = 4 times has radius 0, and a sample equal to it lies at distance
    0, on the radius: inside. (Small integers: every fp16 distance is exact.)"""
    ref = torch.tensor([[0.0, 0.0], [4.0, 0.0]]).repeat_interleave(4, dim=0)
    samples = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 0.0], [4.0, 0.0], [100.0, 100.0]])
    # Sample radii: 16 (the 3rd neighbour of a sample at a reference point is the other pair), so every reference
    # point is inside a sample's ball; only the far sample is outside every reference ball.
    assert precision_recall(ref, samples, 3, 4) == (0.8, 1.0)


def test_precision_recall_needs_k_plus_one_points():
    feats = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="at least 4 reference images, got 3"):
        precision_recall(feats, torch.zeros(10, 4))


#################################################################################
#                            Reading the .npz files                             #
#################################################################################

@pytest.mark.parametrize("layout", ["uint8", "uint8-compressed", "float64", "big-endian-float32", "fortran"])
def test_reader_streams_the_same_rows_as_np_load(tmp_path, layout):
    images = np.random.default_rng(10).integers(0, 256, (11, 5, 7, 3))
    images = {"uint8": images.astype(np.uint8), "uint8-compressed": images.astype(np.uint8),
              "float64": images.astype(np.float64), "big-endian-float32": images.astype(">f4"),
              "fortran": np.asfortranarray(images.astype(np.uint8))}[layout]
    path = str(tmp_path / "images.npz")
    (np.savez_compressed if layout.endswith("compressed") else np.savez)(path, images, np.arange(11))
    reader = NpzArrayReader(path)  # the reader streams any dtype; open_images then admits only uint8
    assert reader.shape == images.shape and len(reader) == 11
    for batch_size in (4, 11, 64):
        batches = list(reader.iter_batches(batch_size))
        assert [start for start, _ in batches] == list(range(0, 11, batch_size))
        np.testing.assert_array_equal(np.concatenate([rows for _, rows in batches]), images)


@pytest.mark.parametrize("content,message", [
    ({"arr_1": np.zeros((2, 4, 4, 3), np.uint8)}, r"missing arr_0 in npz file \(keys: arr_1\)"),
    ({"arr_0": np.zeros((2, 4, 4), np.uint8)}, r"\(N, H, W, 3\).*\(2, 4, 4\)"),
    ({"arr_0": np.zeros((2, 4, 4, 4), np.uint8)}, r"\(N, H, W, 3\).*\(2, 4, 4, 4\)"),
    ({"arr_0": np.zeros((0, 4, 4, 3), np.uint8)}, r"non-empty"),
    ({"arr_0": np.zeros((2, 4, 4, 3), np.complex64)}, r"dtype complex64"),
])
def test_reader_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **content)
    with pytest.raises(ValueError, match=rf"bad\.npz: .*{message}"):
        open_images(str(path))


def test_reader_rejects_a_file_that_is_not_an_npz(tmp_path):
    (tmp_path / "x.npz").write_text("not a zip")
    with pytest.raises(ValueError, match=r"x\.npz: not an \.npz file"):
        NpzArrayReader(str(tmp_path / "x.npz"))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        NpzArrayReader(str(tmp_path / "missing.npz"))


def test_a_damaged_npz_names_the_file(tmp_path):
    """One flipped byte inside arr_0's data: zip's CRC check fails when the rows are read; the error names the file
    (it was a BadZipFile traceback naming none)."""
    path = tmp_path / "flipped.npz"
    np.savez(path, arr_0=np.arange(20 * 8 * 8 * 3, dtype=np.int64).astype(np.uint8).reshape(20, 8, 8, 3))
    data = bytearray(path.read_bytes())
    data[300] ^= 0xFF  # past the zip and .npy headers, inside the pixels
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"flipped\.npz: arr_0 is damaged \(Bad CRC-32.*write the file again"):
        for _ in open_images(str(path)).iter_batches(8):  # a small member fails already in its header's read
            pass
    big = tmp_path / "big.npz"
    np.savez(big, arr_0=np.zeros((64, 64, 64, 3), np.uint8))  # 786 KB: the damage is found while streaming rows
    data = bytearray(big.read_bytes())
    data[len(data) // 2] ^= 0xFF
    big.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"big\.npz: arr_0 is damaged \(Bad CRC-32.*while reading rows"):
        for _ in open_images(str(big)).iter_batches(8):
            pass



def test_a_truncated_npz_yields_its_whole_rows_then_names_the_row_where_it_ends(tmp_path):
    """arr_0's header promises 10 rows, its data holds 5 and a bit (the CRC matches what was written): the rows
    before the end are read, deflated or stored, then the reader names the row the data ends in."""
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        path = tmp_path / "short.npz"
        rows = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3)).astype(np.uint8)
        with zipfile.ZipFile(path, "w", compression) as archive, archive.open("arr_0.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                     "shape": (10, 4, 4, 3)})
            f.write(rows.tobytes() + bytes(7))
        batches = []
        with pytest.raises(ValueError, match=r"short\.npz: arr_0 is truncated \(ends inside row 5\)"):
            for _, batch in open_images(str(path)).iter_batches(3):
                batches.append(batch)
        assert len(batches) == 1 and np.array_equal(batches[0], rows[:3])

def test_statistics_with_a_nan_are_refused_naming_the_file_instead_of_hanging(tmp_path):
    """scipy's sqrtm of a matrix with a NaN does not return: the evaluator sat 13 minutes in 'Computing
    evaluations...'. Stored statistics are checked when read, computed ones before the FID."""
    ref = tmp_path / "ref.npz"
    sigma = np.eye(POOL_DIM)
    sigma[3, 5] = np.nan
    np.savez(ref, np.zeros((4, 8, 8, 3), np.uint8), mu=np.zeros(POOL_DIM), sigma=sigma, mu_s=np.zeros(SPATIAL_DIM),
             sigma_s=np.eye(SPATIAL_DIM))
    with pytest.raises(ValueError, match=r"ref\.npz: its stored statistics: sigma holds 1 NaN or infinite value"):
        evaluator.read_statistics(str(ref))
    acts = np.ones((4, 3))
    acts[1, 2] = np.inf
    stats = {"pool": evaluator.compute_statistics(acts), "spatial": evaluator.compute_statistics(np.ones((4, 3)))}
    with pytest.raises(ValueError, match=r"samples.npz: x: mu holds 1 NaN or infinite value"):
        evaluator.check_finite_statistics(stats, "samples.npz: x")


def test_images_that_are_not_uint8_are_refused_from_the_header_without_loading_them(tmp_path, monkeypatch):
    path = tmp_path / "fortran.npz"
    np.savez(path, np.asfortranarray(np.zeros((4, 8, 8, 3), np.float32)))  # a layout the reader loads whole

    def no_load(*args, **kwargs):
        raise AssertionError("the images were loaded before their dtype was checked")

    monkeypatch.setattr(evaluator.np, "load", no_load)
    with pytest.raises(ValueError, match=r"fortran\.npz: arr_0 has dtype float32"):
        open_images(str(path))


def test_statistics_are_read_only_when_mu_is_present_and_shapes_are_checked(tmp_path):
    np.savez(tmp_path / "plain.npz", np.zeros((2, 4, 4, 3), np.uint8))
    assert read_statistics(str(tmp_path / "plain.npz")) is None
    np.savez(tmp_path / "bad.npz", np.zeros((2, 4, 4, 3), np.uint8), mu=np.zeros(2048), sigma=np.eye(3),
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    with pytest.raises(ValueError, match=r"bad\.npz: sigma has shape \(3, 3\), expected \(2048, 2048\)"):
        read_statistics(str(tmp_path / "bad.npz"))


#################################################################################
#                    evaluate() end to end with a stub network                  #
#################################################################################

STUB_DIMS = 6


class StubInception(torch.nn.Module):
    """Cheap stand-in for the Inception: features from per-channel means of the left and right image halves, in
    the first STUB_DIMS dimensions (the rest exactly 0, so the covariances are block-diagonal)."""

    def forward(self, images):
        x = images.float()
        half = x.shape[-1] // 2
        feats = torch.cat([x[..., :half].mean((2, 3)), x[..., half:].mean((2, 3))], dim=1) / 32  # (N, 6)
        pool = torch.zeros(len(x), POOL_DIM)
        pool[:, :STUB_DIMS] = feats
        spatial = torch.zeros(len(x), SPATIAL_DIM)
        spatial[:, :STUB_DIMS] = feats.flip(1) ** 2
        logits = torch.zeros(len(x), NUM_CLASSES)
        logits[:, :STUB_DIMS] = 3 * feats
        return InceptionFeatures(pool, spatial, logits)


def block_sqrtm(matrix):
    """sqrtm of a matrix that is zero outside its leading STUB_DIMS x STUB_DIMS block (exact for such matrices,
    and quick, where scipy's sqrtm on 2048 x 2048 takes tens of seconds on a small CPU)."""
    assert not matrix[STUB_DIMS:].any() and not matrix[:, STUB_DIMS:].any()
    root = scipy.linalg.sqrtm(matrix[:STUB_DIMS, :STUB_DIMS])
    out = np.zeros(matrix.shape, root.dtype)
    out[:STUB_DIMS, :STUB_DIMS] = root
    return out


@pytest.fixture
def stub_network(monkeypatch):
    monkeypatch.setattr(evaluator, "load_inception", lambda weights, device: StubInception())
    monkeypatch.setattr(evaluator, "_sqrtm", block_sqrtm)


def test_evaluate_matches_recomputation_from_the_features(tmp_path, stub_network):
    rng = np.random.default_rng(11)
    ref_images = rng.integers(0, 256, (16, 8, 8, 3)).astype(np.uint8)
    sample_images = rng.integers(0, 256, (20, 6, 10, 3)).astype(np.uint8)  # another size: allowed when asked
    np.savez(tmp_path / "ref.npz", ref_images)
    np.savez_compressed(tmp_path / "sample.npz", sample_images, np.arange(20))
    lines = []
    kwargs = dict(inception_weights="random", device="cpu", batch_size=3, is_split_size=6, pr_batch_size=7,
                  cache_dir=str(tmp_path / "cache"), progress=False, allow_resolution_mismatch=True)
    results = evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), log=lines.append, **kwargs)

    stub = StubInception()
    ref_feats = stub(torch.from_numpy(ref_images).permute(0, 3, 1, 2))
    sample_feats = stub(torch.from_numpy(sample_images).permute(0, 3, 1, 2))
    probs = torch.softmax(sample_feats.logits, dim=1).numpy()
    # The stub's features are per-image means of uint8 pixels (integer sums, exact in float32 in any order, then one
    # division): the same bits in evaluate()'s batches of 3 as here. IS: float32, as in the test above.
    assert results["inception_score"] == pytest.approx(inception_score_reference(probs, 6), rel=1e-5)
    for key, name in (("fid", "pool"), ("sfid", "spatial")):
        ref_block = getattr(ref_feats, name).numpy()[:, :STUB_DIMS]
        sample_block = getattr(sample_feats, name).numpy()[:, :STUB_DIMS]
        (mu1, sigma1), (mu2, sigma2) = compute_statistics(sample_block), compute_statistics(ref_block)
        expected = fid_reference(mu1, sigma1, mu2, sigma2)
        # ADM's float32 mean difference against float64 here (see fid_tolerance): <= 5e-6 on the sFID of 15
        assert results[key] == pytest.approx(expected, rel=0, abs=fid_tolerance(mu1, mu2, expected))
    # Exact: the fp16 rounding of every float32 sum here is at least 11 eps32 (relative) from an fp16 rounding
    # boundary, more than a float32 sum of 6 positive products can move (3 eps32), so torch's and numpy's BLAS
    # give the same fp16 distances.
    assert (results["precision"], results["recall"]) == precision_recall_reference(
        ref_feats.pool.numpy()[:, :STUB_DIMS], sample_feats.pool.numpy()[:, :STUB_DIMS])

    assert lines[-7] == evaluator.RANDOM_WEIGHTS_WARNING and lines.count(evaluator.RANDOM_WEIGHTS_WARNING) == 1
    assert lines[-6].startswith("WARNING: ") and "6x10 images" in lines[-6] and "8x8" in lines[-6]
    assert lines[-5:] == [f"Inception Score: {results['inception_score']}", f"FID: {results['fid']}",
                          f"sFID: {results['sfid']}", f"Precision: {results['precision']}",
                          f"Recall: {results['recall']}"]
    assert results["settings"]["activation_cache"] == "miss"
    assert results["settings"]["num_samples"] == 20 and results["settings"]["is_split_size"] == 6
    again = evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), log=None, **kwargs)
    assert again["settings"]["activation_cache"] == "hit"
    assert {k: again[k] for k in ("inception_score", "fid", "sfid", "precision", "recall")} == \
        {k: results[k] for k in ("inception_score", "fid", "sfid", "precision", "recall")}


def test_evaluate_refuses_bad_sample_sets(tmp_path, stub_network):
    np.savez(tmp_path / "ref.npz", np.zeros((8, 4, 4, 3), np.uint8))
    np.savez(tmp_path / "few.npz", np.zeros((5, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"few\.npz: 5 samples, fewer than one Inception-Score split of 5000"):
        evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "few.npz"), inception_weights="random", log=None)


@pytest.fixture
def inception_loads(monkeypatch):
    """The stub network, with a record of every load: what evaluate() refuses, it must refuse before this work."""
    loads = []

    def load(weights, device):
        loads.append(weights)
        return StubInception()

    monkeypatch.setattr(evaluator, "load_inception", load)
    monkeypatch.setattr(evaluator, "_sqrtm", block_sqrtm)
    return loads


UINT8_HINT = "np.clip(np.round(x * 255), 0, 255).astype(np.uint8)"


@pytest.mark.parametrize("bad_file", ["ref", "sample"])
@pytest.mark.parametrize("dtype,scale", [(np.float32, 1), (np.float64, 255), (np.uint16, 255), (np.int64, 255)])
def test_images_that_are_not_uint8_are_refused_before_any_work(tmp_path, inception_loads, bad_file, dtype, scale):
    """Float images in [0, 1] once gave FID 6174 without a word; ADM's batches and our samplers hold uint8."""
    images = np.random.default_rng(13).integers(0, 256, (6, 8, 8, 3))
    for name in ("ref", "sample"):
        np.savez(tmp_path / f"{name}.npz",
                 (images / 255 * scale).astype(dtype) if name == bad_file else images.astype(np.uint8))
    with pytest.raises(ValueError) as raised:
        evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), inception_weights="random", device="cpu",
                 is_split_size=6, use_cache=False, progress=False, log=None)
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / bad_file}.npz: arr_0 has dtype {np.dtype(dtype)}") and UINT8_HINT in message
    assert inception_loads == []


#################################################################################
#                 The CLI, with the real architecture (random weights)          #
#################################################################################

def _diagonal_sqrtm(matrix):
    assert np.count_nonzero(matrix - np.diag(np.diagonal(matrix))) == 0
    return np.diag(np.sqrt(np.diagonal(matrix)))


@pytest.mark.parametrize("size", [(24, 20), (512, 512)], ids=["small", "VIRTUAL_imagenet512-layout"])
def test_cli_prints_adm_lines_and_writes_json(tmp_path, monkeypatch, capsys, size):
    """Both files carry ADM statistics with diagonal covariances, so FID and sFID have a closed form (and the
    2048-dim sqrtm is cheap); IS and precision/recall run through the random-weight Inception. At 512 px: the layout
    of ADM's VIRTUAL_imagenet512.npz (512x512 images beside their mu/sigma/mu_s/sigma_s)."""
    rng = np.random.default_rng(12)
    stats = {}
    for name, n in (("ref", 4), ("sample", 4)):
        stats[name] = dict(mu=rng.normal(size=POOL_DIM), sigma=np.diag(rng.uniform(0.5, 2, POOL_DIM)),
                           mu_s=rng.normal(size=SPATIAL_DIM), sigma_s=np.diag(rng.uniform(0.5, 2, SPATIAL_DIM)))
        np.savez(tmp_path / f"{name}.npz", rng.integers(0, 256, (n,) + size + (3,)).astype(np.uint8),
                 **stats[name])
    monkeypatch.setattr(evaluator, "_sqrtm", _diagonal_sqrtm)
    evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--inception-weights", "random",
                    "--is-split-size", "4", "--device", "cpu", "--json", str(tmp_path / "out" / "metrics.json"),
                    "--cache-dir", str(tmp_path / "cache")])
    lines = capsys.readouterr().out.splitlines()
    # The random-weights warning once, next to the numbers (line -6), not also at the start.
    assert lines.count(evaluator.RANDOM_WEIGHTS_WARNING) == 1 and lines[-6] == evaluator.RANDOM_WEIGHTS_WARNING
    assert lines[0:5] == ["computing reference batch activations...",
                          "computing/reading reference batch statistics...",
                          "computing sample batch activations...",
                          "computing/reading sample batch statistics...",
                          "Computing evaluations..."]
    labels = ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert [line.split(": ")[0] for line in lines[-5:]] == labels
    printed = {label: line.split(": ", 1)[1] for label, line in zip(labels, lines[-5:])}
    with open(tmp_path / "out" / "metrics.json") as f:
        saved = json.load(f)
    for label, key in zip(labels, ("inception_score", "fid", "sfid", "precision", "recall")):
        assert printed[label] == str(saved[key])

    def closed_form(a, b, mu, sigma):  # sample first, as ADM calls it
        var1, var2 = np.diagonal(stats[a][sigma]), np.diagonal(stats[b][sigma])
        return np.sum((stats[a][mu] - stats[b][mu]) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    # float64 statistics from the files, diagonal covariances: sums of 2048 terms, <= 2048 eps64 = 5e-13 relative
    assert saved["fid"] == pytest.approx(closed_form("sample", "ref", "mu", "sigma"), rel=1e-9)
    assert saved["sfid"] == pytest.approx(closed_form("sample", "ref", "mu_s", "sigma_s"), rel=1e-9)
    assert 1.0 <= saved["inception_score"] <= 4.0  # at most the split size
    assert saved["precision"] * 4 in (0, 1, 2, 3, 4) and saved["recall"] * 4 in (0, 1, 2, 3, 4)
    assert saved["settings"]["ref_statistics"].startswith("from ref_batch")
    assert saved["settings"]["inception_id"] == "random-seed0" and "meaningless" in saved["warning"]


def test_cli_script_runs_standalone_and_reports_bad_input(tmp_path):
    np.savez(tmp_path / "ref.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "sample.npz", np.zeros((4, 8, 8, 3), np.uint8))
    result = subprocess.run([sys.executable, "-m", "evaluations.evaluator", str(tmp_path / "ref.npz"),
                             str(tmp_path / "sample.npz")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr  # operations/cli.py: user input, one line
    assert re.search(r"error: .*ref\.npz: missing arr_0 in npz file \(keys: images\)", result.stderr)


def _cli_inputs(tmp_path, n=6):
    """Two small uint8 batches and the flags that evaluate them with the stub network."""
    images = np.random.default_rng(14).integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)
    np.savez(tmp_path / "ref.npz", images)
    np.savez(tmp_path / "sample.npz", images[::-1])
    return [str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--inception-weights", "random", "--device",
            "cpu", "--is-split-size", str(n)]


@pytest.mark.parametrize("target", ["afile/metrics.json", "afile/sub/metrics.json", "adir"])
def test_unwritable_json_is_refused_before_any_work(tmp_path, inception_loads, target):
    (tmp_path / "afile").write_text("a file, not a folder")  # a parent that is a file fails even for root
    (tmp_path / "adir").mkdir()
    args = _cli_inputs(tmp_path) + ["--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(ValueError) as raised:
        evaluator.main(args + ["--json", str(tmp_path / target)])
    assert "--json" in str(raised.value) and str(tmp_path / target) in str(raised.value)
    assert inception_loads == [] and not (tmp_path / "cache").exists()
    assert (tmp_path / "afile").read_text() == "a file, not a folder" and not list((tmp_path / "adir").iterdir())
    # A folder that does not exist yet is fine, and the write probe leaves nothing behind.
    evaluator.main(args + ["--json", str(tmp_path / "new" / "sub" / "metrics.json")])
    assert os.listdir(tmp_path / "new" / "sub") == ["metrics.json"] and len(os.listdir(tmp_path / "cache")) == 1


@pytest.mark.parametrize("target", ["afile/cache", "afile"])
def test_unwritable_cache_dir_is_refused_before_any_work(tmp_path, inception_loads, target):
    (tmp_path / "afile").write_text("a file, not a folder")
    args = _cli_inputs(tmp_path) + ["--cache-dir", str(tmp_path / target), "--json", str(tmp_path / "m.json")]
    with pytest.raises(ValueError) as raised:
        evaluator.main(args)
    assert "--cache-dir" in str(raised.value) and str(tmp_path / target) in str(raised.value)
    assert inception_loads == [] and not (tmp_path / "m.json").exists()
    assert (tmp_path / "afile").read_text() == "a file, not a folder"
    evaluator.main(args + ["--no-cache"])  # a cache that is not used is not checked
    assert json.load(open(tmp_path / "m.json"))["settings"]["activation_cache"] == "off"


def test_samples_at_another_resolution_are_refused_naming_both_sizes_unless_asked(tmp_path, inception_loads,
                                                                                  capsys):
    """128-px samples against a 64-px reference once gave an FID without a word (the Inception resizes both to 299
    px). Refused before any work, one line naming both sizes and the flag; with the flag, evaluated with a warning."""
    rng = np.random.default_rng(15)
    np.savez(tmp_path / "ref.npz", rng.integers(0, 256, (6, 64, 64, 3)).astype(np.uint8))
    np.savez(tmp_path / "sample.npz", rng.integers(0, 256, (6, 128, 128, 3)).astype(np.uint8))
    args = [str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--inception-weights", "random", "--device",
            "cpu", "--is-split-size", "6", "--no-cache", "--json", str(tmp_path / "m.json")]
    result = subprocess.run([sys.executable, "-m", "evaluations.evaluator", *args], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.fullmatch(r"error: .*sample\.npz holds 128x128 images, the reference batch .*ref\.npz 64x64 .*"
                        r"--allow-resolution-mismatch\n", result.stderr)
    assert not (tmp_path / "m.json").exists()
    evaluator.main([*args, "--allow-resolution-mismatch"])
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING: ")]
    assert [w for w in warnings if "128x128" in w and "64x64" in w] and len(warnings) == 2  # and the random one
    assert json.load(open(tmp_path / "m.json"))["settings"]["image_sizes"] == {"ref": [64, 64], "samples": [128, 128]}


@pytest.mark.parametrize("flag", ["--batch-size", "--is-split-size", "--pr-batch-size"])
@pytest.mark.parametrize("bad", ["0", "-1"])
def test_sizes_are_checked_where_they_enter_naming_the_flag(tmp_path, inception_loads, capsys, flag, bad):
    with pytest.raises(SystemExit) as exited:
        evaluator.main([*_cli_inputs(tmp_path), "--json", str(tmp_path / "m.json"), flag, bad])
    assert exited.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err
    assert inception_loads == [] and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("damage", ["not an npz", "spatial of another width", "no spatial"])
def test_a_cache_file_that_does_not_hold_the_batchs_activations_is_computed_again(tmp_path, stub_network, damage):
    """The cache is keyed by the reference file's sha256; a file under that key that cannot be read, or holds
    activations of other shapes, once ended in a traceback or fed them to the statistics."""
    args = _cli_inputs(tmp_path)
    kwargs = dict(inception_weights="random", device="cpu", is_split_size=6, cache_dir=str(tmp_path / "cache"),
                  progress=False, log=None)
    first = evaluate(args[0], args[1], **kwargs)
    (cache_file,) = (tmp_path / "cache").iterdir()
    if damage == "not an npz":
        cache_file.write_bytes(b"garbage")
    else:
        with np.load(cache_file) as cached:
            pool = cached["pool"]
        spatial = {"spatial": np.zeros((len(pool), SPATIAL_DIM - 1), np.float32)} if "width" in damage else {}
        np.savez(cache_file, pool=pool, **spatial)
    again = evaluate(args[0], args[1], **kwargs)
    assert again["settings"]["activation_cache"] == "miss" and again["sfid"] == first["sfid"]
    assert evaluate(args[0], args[1], **kwargs)["settings"]["activation_cache"] == "hit"


#################################################################################
#                     FD-DINOv2 (evaluations/fd_dinov2.py)                       #
#################################################################################

def test_fd_dinov2_is_edm2s_distance_recomputed_with_numpy():
    """edm2's calculate_stats_for_iterable and calculate_metrics_from_stats, written with numpy's mean and unbiased
    covariance and scipy's sqrtm of sigma_samples @ sigma_reference; and the closed form for diagonal covariances,
    |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    from evaluations import fd_dinov2
    rng = np.random.default_rng(3)
    samples = (rng.normal(size=(300, 12)) * rng.uniform(0.5, 2, 12) + 1).astype(np.float32)
    reference = (rng.normal(size=(250, 12)) @ rng.normal(size=(12, 12)) * 0.3).astype(np.float32)
    (mu1, s1), (mu2, s2) = ((x.astype(np.float64).mean(0), np.cov(x.astype(np.float64), rowvar=False))
                            for x in (samples, reference))
    expected = float(np.real(np.square(mu1 - mu2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2))))
    # float64 throughout: sums of 300 products and a 12 x 12 matrix root differ in the last ~1e-13 relative.
    got = fd_dinov2.frechet_distance(*fd_dinov2.statistics(samples), *fd_dinov2.statistics(reference))
    assert got == pytest.approx(expected, rel=1e-9)
    a, b = rng.uniform(0.1, 3, 12), rng.uniform(0.1, 3, 12)
    closed = float(np.square(mu1 - mu2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum())
    assert fd_dinov2.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 images"):
        fd_dinov2.statistics(samples[:1])


def test_fd_dinov2_preprocessing_is_edm2s():
    """edm2's DINOv2Detector before the network (resize_mode 'torch'), written out: any image size to 224 x 224."""
    from evaluations import fd_dinov2
    images = torch.randint(0, 256, (3, 3, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = torch.nn.functional.interpolate(images.to(torch.float32), size=(224, 224), mode="bicubic", antialias=True)
    x = x.to(torch.float32) / 255
    x = x - torch.tensor([0.485, 0.456, 0.406]).reshape(1, -1, 1, 1)
    x = x / torch.tensor([0.229, 0.224, 0.225]).reshape(1, -1, 1, 1)
    assert torch.equal(fd_dinov2.preprocess(images), x)  # the same float32 operations in the same order


def hub_class_token(model, x):
    """torch.hub dinov2_vitl14's forward (DinoVisionTransformer, interpolate_offset 0.1, interpolate_antialias
    False) on a tests/test_encoders.py OfficialDinoV2: the final-normed class token."""
    import math
    import torch.nn.functional as F
    n, dim = model.pos_embed.shape[1] - 1, model.pos_embed.shape[-1]
    m, w0 = int(math.sqrt(n)), x.shape[-1] // 14
    patch_pos = F.interpolate(model.pos_embed[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
                              scale_factor=((w0 + 0.1) / m, (w0 + 0.1) / m), antialias=False)
    pos = torch.cat([model.pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], dim=1) + pos
    for block in model.blocks:
        tokens = tokens + block.ls1.gamma * model._attn(block.attn, block.norm1(tokens))
        tokens = tokens + block.ls2.gamma * model._mlp(block.mlp, block.norm2(tokens))
    return model.norm(tokens)[:, 0]


def test_fd_dinov2_features_are_the_dinov2_hub_models_class_token(test_size_dinov2):
    from evaluations import fd_dinov2
    model, path = test_size_dinov2
    fd = fd_dinov2.FdDinov2(path, torch.device("cpu"), "--dinov2-weights")
    images = np.random.default_rng(1).integers(0, 256, (2, 40, 40, 3)).astype(np.uint8)
    with torch.no_grad():
        expected = hub_class_token(model, fd_dinov2.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2)))
    # Two float32 forwards of a 2-block, 48-wide ViT (fused attention against the plain one): a few 1e-6 on |t| <= 4;
    # timm's antialiased pos-embed resampling instead of DINOv2's moves the class token by O(1e-2).
    torch.testing.assert_close(torch.from_numpy(fd.features(images)), expected, rtol=1e-4, atol=1e-4)


def test_evaluate_adds_fd_dinov2_from_cached_reference_statistics(tmp_path, stub_network, test_size_dinov2):
    from evaluations import fd_dinov2
    from operations.files import file_sha256
    _, path = test_size_dinov2
    rng = np.random.default_rng(12)
    ref_images = rng.integers(0, 256, (16, 8, 8, 3)).astype(np.uint8)
    sample_images = rng.integers(0, 256, (20, 6, 10, 3)).astype(np.uint8)
    np.savez(tmp_path / "ref.npz", ref_images)
    np.savez(tmp_path / "sample.npz", sample_images)
    kwargs = dict(inception_weights="random", device="cpu", batch_size=3, is_split_size=6,
                  cache_dir=str(tmp_path / "cache"), progress=False, fd_dinov2=True, dinov2_weights=path,
                  allow_resolution_mismatch=True)  # FD-DINOv2 resizes any size to 224
    lines = []
    results = evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), log=lines.append, **kwargs)
    fd = fd_dinov2.FdDinov2(path, torch.device("cpu"), "--dinov2-weights")
    # The features in the evaluator's batches of 3 (the same GEMM shapes, so the same bits), then numpy's float64
    # mean and covariance and scipy's root. With 16 and 20 images of 48 features the covariances are singular: the
    # root turns the float64 rounding of each zero eigenvalue (~1e-16) into ~1e-8, so 48 of them bound the
    # difference by ~1e-6 (measured: 2e-10); a wrong feature, order or normalisation moves it by O(1e-2).
    (mu1, s1), (mu2, s2) = ((f.astype(np.float64).mean(0), np.cov(f.astype(np.float64), rowvar=False)) for f in (
        np.concatenate([fd.features(images[i:i + 3]) for i in range(0, len(images), 3)])
        for images in (sample_images, ref_images)))
    expected = float(np.real(np.square(mu1 - mu2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2))))
    assert results["fd_dinov2"] == pytest.approx(expected, rel=0, abs=1e-6)
    assert lines[-1] == f"FD_DINOv2: {results['fd_dinov2']}"
    source = results["settings"]["fd_dinov2"]["reference_statistics"]
    assert source["cache"] == "miss" and source["num_images"] == 16
    assert source["ref_sha256"] == file_sha256(str(tmp_path / "ref.npz"))
    assert source["dinov2_weights_sha256"] == file_sha256(path)
    (cached,) = [n for n in os.listdir(tmp_path / "cache") if n.startswith("fd-dinov2-")]
    with np.load(tmp_path / "cache" / cached) as data:
        assert json.loads(str(data["source"]))["ref_batch"] == str(tmp_path / "ref.npz")
    again = evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), log=None, **kwargs)
    assert again["fd_dinov2"] == results["fd_dinov2"]
    assert again["settings"]["fd_dinov2"]["reference_statistics"]["cache"] == "hit"


def test_fd_dinov2_without_weights_is_refused_before_any_work(tmp_path, inception_loads):
    np.savez(tmp_path / "ref.npz", np.zeros((8, 4, 4, 3), np.uint8))
    np.savez(tmp_path / "sample.npz", np.zeros((8, 4, 4, 3), np.uint8))
    with pytest.raises(evaluator.MissingInput, match=r"nowhere\.pth.*dinov2_vitl14_pretrain\.pth.*--dinov2-weights"):
        evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), inception_weights="random",
                 is_split_size=4, fd_dinov2=True, dinov2_weights=str(tmp_path / "nowhere.pth"), log=None)
    assert inception_loads == []
