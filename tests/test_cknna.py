"""evaluations/cknna.py: CKNNA and linear CKA against plain numpy definitions, their invariances, and the CLI on a tiny
checkpoint of our format (Phase-1 truncated and full) over the demo data."""
import argparse
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from operations.checkpoint import save_checkpoint
from erw.data import ImageLatentDataset, sample_latents
from erw.generation import sample_generator
from erw.transport import get_path
from evaluations import cknna as ck
from models.encoders import load_teachers
from models.sit import create_sit


#################################################################################
#                       Plain numpy references (appendix C.1)                   #
#################################################################################

def numpy_hsic_unbiased(a, b):
    """Song et al. (2012) eq. 5 on dense m x m matrices, diagonals zeroed."""
    m = a.shape[0]
    a, b = a.copy(), b.copy()
    np.fill_diagonal(a, 0.0)
    np.fill_diagonal(b, 0.0)
    return (np.trace(a @ b) + a.sum() * b.sum() / ((m - 1) * (m - 2)) - 2.0 * (a @ b).sum() / (m - 2)) / (m * (m - 3))


def numpy_knn_mask(kernel, k):
    """mask[i, j] = 1 iff j != i is among the k largest kernel[i, :] off the diagonal."""
    n = kernel.shape[0]
    mask = np.zeros((n, n))
    for i in range(n):
        others = [j for j in range(n) if j != i]
        best = sorted(others, key=lambda j: -kernel[i, j])[:k]
        mask[i, best] = 1.0
    return mask


def numpy_cknna(x, y, k):
    kernel_x, kernel_y = x @ x.T, y @ y.T
    mask_x, mask_y = numpy_knn_mask(kernel_x, k), numpy_knn_mask(kernel_y, k)
    alpha = mask_x * mask_y
    align_xy = numpy_hsic_unbiased(alpha * kernel_x, alpha * kernel_y)
    align_xx = numpy_hsic_unbiased(mask_x * kernel_x, mask_x * kernel_x)
    align_yy = numpy_hsic_unbiased(mask_y * kernel_y, mask_y * kernel_y)
    return align_xy / math.sqrt(align_xx * align_yy)


def numpy_linear_cka(x, y):
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    kernel_x, kernel_y = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)
    return hsic(kernel_x, kernel_y) / math.sqrt(hsic(kernel_x, kernel_x) * hsic(kernel_y, kernel_y))


def correlated_pair(n, dx, dy, seed, noise=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dx))
    y = x @ rng.normal(size=(dx, dy)) + noise * rng.normal(size=(n, dy))
    return x, y


#################################################################################
#                                    Metrics                                    #
#################################################################################
# The metric tests run in float64 on both sides (torch here, numpy in the references). CKNNA and CKA are ratios of
# HSICs, sums of O(n^2) products of O(1) kernel values whose cancellations leave results of 0.03 or more: float64 (eps
# 2.2e-16) keeps them within ~1e-13 relative, so rel=1e-10 (abs=1e-12 near 1) has room and still sees any wrong
# term. The kNN masks are discontinuous, but the k-th and (k+1)-th neighbours' kernel values differ by >= 1.3e-4
# (relative) in these data, far above float64 rounding, so both sides select the same neighbours.

@pytest.mark.parametrize("n,k,seed", [(30, 3, 0), (41, 10, 1), (25, 24, 2)])
def test_cknna_matches_the_dense_numpy_definition(n, k, seed):
    x, y = correlated_pair(n, 8, 5, seed)
    expected = numpy_cknna(x, y, k)
    got = ck.cknna(torch.from_numpy(x), torch.from_numpy(y), topk=k)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert 0.05 < abs(expected) < 1  # neither degenerate nor trivially 1


def test_cknna_on_prepared_features_matches_numpy():
    x, y = correlated_pair(60, 16, 12, 3, noise=2.0)
    prepared_x, prepared_y = ck.prepare_features(torch.from_numpy(x)), ck.prepare_features(torch.from_numpy(y))
    expected = numpy_cknna(prepared_x.numpy(), prepared_y.numpy(), 10)
    assert ck.cknna(prepared_x, prepared_y, 10) == pytest.approx(expected, rel=1e-10)


def test_sparse_unbiased_hsic_is_songs_u_statistic():
    # The closed form equals the U-statistic over distinct quadruples (Song et al. 2012, theorem 2) for symmetric
    # kernels: an independent check of the formula itself, here on a full off-diagonal support.
    m = 6
    x, y = correlated_pair(m, 3, 2, 4)
    kernel_x, kernel_y = x @ x.T, y @ y.T
    total = 0.0
    quadruples = list(itertools.permutations(range(m), 4))
    for quad in quadruples:
        h = 0.0
        for s, t, u, v in itertools.permutations(quad):
            h += kernel_x[s, t] * kernel_y[s, t] + kernel_x[s, t] * kernel_y[u, v] - 2 * kernel_x[s, t] * kernel_y[s, u]
        total += h / 24
    u_statistic = total / len(quadruples)
    rows, cols = zip(*[(i, j) for i in range(m) for j in range(m) if i != j])
    rows, cols = torch.tensor(rows), torch.tensor(cols)
    got = ck.hsic_unbiased_sparse(rows, cols, torch.from_numpy(kernel_x)[rows, cols],
                                  torch.from_numpy(kernel_y)[rows, cols], m)
    assert float(got) == pytest.approx(u_statistic, rel=1e-10)
    assert float(got) == pytest.approx(numpy_hsic_unbiased(kernel_x, kernel_y), rel=1e-10)


def test_sparse_unbiased_hsic_matches_dense_on_an_asymmetric_mask():
    rng = np.random.default_rng(5)
    n = 20
    mask = (rng.random((n, n)) < 0.3).astype(float)
    np.fill_diagonal(mask, 0.0)
    a, b = mask * rng.normal(size=(n, n)), mask * rng.normal(size=(n, n))
    rows, cols = (torch.from_numpy(v) for v in np.nonzero(mask))
    got = ck.hsic_unbiased_sparse(rows, cols, torch.from_numpy(a)[rows, cols], torch.from_numpy(b)[rows, cols], n)
    assert float(got) == pytest.approx(numpy_hsic_unbiased(a, b), rel=1e-10)


def test_linear_cka_matches_numpy():
    x, y = correlated_pair(50, 7, 4, 6)
    expected = numpy_linear_cka(x, y)
    assert ck.linear_cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-10)
    assert 0.1 < expected < 1


def test_prepare_features_matches_numpy():
    rng = np.random.default_rng(7)
    feats = rng.standard_t(df=2, size=(30, 40))  # heavy tails: the clamp matters
    threshold = np.quantile(np.abs(feats), 0.95, axis=1).mean()
    clamped = np.clip(feats, -threshold, threshold)
    expected = clamped / np.linalg.norm(clamped, axis=1, keepdims=True)
    got = ck.prepare_features(torch.from_numpy(feats), 0.95).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    assert not np.allclose(got, feats / np.linalg.norm(feats, axis=1, keepdims=True))
    unclamped = ck.prepare_features(torch.from_numpy(feats), 1.0).numpy()
    np.testing.assert_allclose(unclamped, feats / np.linalg.norm(feats, axis=1, keepdims=True), rtol=1e-12)


def test_identical_features_give_one():
    x, _ = correlated_pair(80, 12, 1, 8)
    x = torch.from_numpy(x)
    assert ck.cknna(x, x, 10) == pytest.approx(1.0, abs=1e-12)
    assert ck.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    prepared = ck.prepare_features(x)
    assert ck.cknna(prepared, prepared, 10) == pytest.approx(1.0, abs=1e-12)
    # a rotation leaves the inner-product kernel unchanged
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert ck.cknna(x, x @ rotation, 10) == pytest.approx(1.0, abs=1e-10)
    assert ck.linear_cka(x, x @ rotation) == pytest.approx(1.0, abs=1e-10)


def test_independent_features_give_near_zero_and_dependent_ones_do_not():
    n, d = 2000, 16
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    independent = torch.randn(n, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dependent = x + 0.2 * independent  # measured: CKNNA 0.66, CKA 0.96 (0.28, 0.79 at 0.5: CKNNA is the stricter)
    prepared_x = ck.prepare_features(x)
    # measured for the independent pair: CKNNA 0.004, CKA 0.008 (CKA's finite-n bias is about d / n)
    for other, low, high in ((independent, -0.03, 0.03), (dependent, 0.5, 1.0)):
        prepared = ck.prepare_features(other)
        assert low < ck.cknna(prepared_x, prepared, 10) < high
        assert low < ck.linear_cka(prepared_x, prepared) < high


def test_isotropic_scaling_changes_nothing():
    x, y = correlated_pair(70, 9, 6, 9)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    assert ck.cknna(3.7 * x, 0.02 * y, 10) == pytest.approx(ck.cknna(x, y, 10), rel=1e-10)
    assert ck.linear_cka(3.7 * x, 0.02 * y) == pytest.approx(ck.linear_cka(x, y), rel=1e-10)
    torch.testing.assert_close(ck.prepare_features(250.0 * x), ck.prepare_features(x), rtol=1e-12, atol=1e-14)


def test_metric_input_errors():
    x = torch.randn(10, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="topk"):
        ck.cknna(x, x, 10)
    with pytest.raises(ValueError, match="same n"):
        ck.cknna(x, x[:9], 3)
    with pytest.raises(ValueError, match="outlier-quantile"):
        ck.prepare_features(x, 0.0)


def test_parse_layers_and_subset():
    assert ck.parse_layers("1,3-5,3") == [1, 3, 4, 5]
    assert ck.parse_layers(None) is None
    for bad in ("a", "-1", ""):
        with pytest.raises(ValueError, match="--layers"):
            ck.parse_layers(bad)
    subset = ck.select_indices(100, 30, seed=0)
    assert subset == sorted(set(subset)) and len(subset) == 30 and subset == ck.select_indices(100, 30, seed=0)
    assert subset != ck.select_indices(100, 30, seed=1)
    assert ck.select_indices(20, 30, seed=0) == list(range(20))


#################################################################################
#                          CLI on tiny checkpoints                              #
#################################################################################

def _tiny_checkpoint(path, demo_data, truncated, depth_or_k, seed):
    """A tiny SiT in our checkpoint format with perturbed weights (adaLN-Zero blocks would be identity maps)."""
    model_args = {"model": "SiT-Tiny/2", "input_size": 8, "in_channels": 4, "num_classes": 10,
                  "cfg_prob": 0.1, "encoder_depth": depth_or_k, "z_dims": [64], "qk_norm": False,
                  "use_rope": False, "built_depth": depth_or_k if truncated else None}
    torch.manual_seed(seed)
    model = create_sit(**model_args)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    config = {"data_dir": str(demo_data), "enc_type": "random-vit-tiny", "enc_weights": None, "resolution": 64}
    if not truncated:
        config["path_type"] = "linear"
    save_checkpoint({"model": model.state_dict(), "ema": model.state_dict(), "step": 2, "config": config,
                     "model_args": model_args}, str(path))
    return model


def _reference_metrics(model, demo_data, layers, t, seed=0, batch_size=64):
    """{layer: (CKNNA, CKA)} by the module docstring's recipe written out: every image, per-image generators,
    mean-pooled tokens, numpy metrics. The networks run in the CLI's batches (its --batch-size): a float32 forward
    may round differently with another batch shape on some CPUs, and a kNN mask can flip on such a difference."""
    dataset = ImageLatentDataset(str(demo_data))
    teacher = load_teachers("random-vit-tiny", 64)[0]
    images, latents, noises, labels = [], [], [], []
    for index in range(len(dataset)):
        image, moments, label = dataset[index]
        generator = sample_generator(seed, index)
        latent = sample_latents(moments[None], generator)[0]
        noises.append(torch.randn(latent.shape, generator=generator))
        images.append(image), latents.append(latent), labels.append(label)
    latents, noises = torch.stack(latents), torch.stack(noises)
    times = torch.full((len(dataset),), t)
    x_t = (1 - t) * latents + t * noises  # the linear path, written out
    # float32 defaults (rtol 1.3e-6, atol 1e-5): the same three roundings on O(1) values (bitwise equal in fact)
    torch.testing.assert_close(x_t, get_path("linear").interpolate(latents, noises, times)[0])
    model.eval()
    labels, images = torch.stack(labels), torch.stack(images)
    with torch.no_grad():
        batches = [model.forward_features(x_t[i:i + batch_size], times[i:i + batch_size], labels[i:i + batch_size],
                                          layers) for i in range(0, len(dataset), batch_size)]
        teacher_feats = torch.cat([teacher(images[i:i + batch_size]).mean(dim=1)
                                   for i in range(0, len(dataset), batch_size)])
        target = ck.prepare_features(teacher_feats).numpy()
    metrics = {}
    for layer in layers:
        prepared = ck.prepare_features(torch.cat([hidden[layer].mean(dim=1) for hidden in batches])).numpy()
        metrics[layer] = numpy_cknna(prepared, target, 10), numpy_linear_cka(prepared, target)
    return metrics


def test_cli_writes_table_and_plot_for_warmup_and_full_checkpoints(demo_data, tmp_path, capsys):
    warmup_path, full_path = tmp_path / "warmup.pt", tmp_path / "full.pt"
    _tiny_checkpoint(warmup_path, demo_data, truncated=True, depth_or_k=2, seed=0)
    full_model = _tiny_checkpoint(full_path, demo_data, truncated=False, depth_or_k=2, seed=1)
    out = tmp_path / "out"
    result = ck.main(["--ckpt", str(warmup_path), str(full_path), "--labels", "warmup", "sit", "--t", "0.3",
                      "--batch-size", "64", "--num-workers", "0", "--device", "cpu", "--output-dir", str(out)])
    assert "holds 160 images (< --num-images 10000): using all of them" in capsys.readouterr().out

    written = json.loads((out / "cknna.json").read_text())
    assert set(written["results"]) == {"warmup", "sit"}
    assert sorted(written["results"]["warmup"], key=int) == ["1", "2"]  # Phase 1: only the k warmed blocks
    assert sorted(written["results"]["sit"], key=int) == ["1", "2", "3", "4"]
    settings = written["settings"]
    assert settings["num_images"] == 160 and settings["num_images_requested"] == 10000
    assert settings["topk"] == 10 and settings["t"] == 0.3 and settings["enc_type"] == "random-vit-tiny"
    assert settings["checkpoints"]["warmup"]["path_type"] == "linear"
    assert settings["checkpoints"]["warmup"]["model_args"]["built_depth"] == 2
    for by_layer in written["results"].values():
        for values in by_layer.values():
            assert math.isfinite(values["cknna"]) and 0.0 <= values["cka"] <= 1.0
    with Image.open(out / "cknna.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 400 and plot.size[1] > 200

    # The float32 features are the CLI's own computation (same inputs, same batches of 64, hence the same kernels
    # and bits on any one CPU); the metrics are float64 on both sides (torch's sparse HSIC, numpy's dense one),
    # ~1e-13 apart (see the Metrics section): rel=1e-9. (With features from other batch shapes, float32 rounding
    # differences of ~1e-7 could swap two neighbours whose kernel values are 4e-7 apart here and move CKNNA by
    # ~2e-4.)
    reference = _reference_metrics(full_model, demo_data, [1, 4], 0.3, batch_size=64)  # the CLI's --batch-size
    for layer, (expected_cknna, expected_cka) in reference.items():
        assert result["results"]["sit"][layer]["cknna"] == pytest.approx(expected_cknna, rel=1e-9)
        assert result["results"]["sit"][layer]["cka"] == pytest.approx(expected_cka, rel=1e-9)
    values = [result["results"]["sit"][layer]["cknna"] for layer in (1, 2, 3, 4)]
    assert len(set(values)) == 4  # each layer's own features, not one layer repeated


def test_cli_reads_a_repa_checkpoint_given_model_flags(demo_data, tmp_path):
    """REPA's train.py layout ({model, ema, opt, args}, no architecture, no training config) with REPA's model flags,
    as sample_ddp.py takes it: the same numbers as the same weights in our layout."""
    ours, warmup = tmp_path / "ours.pt", tmp_path / "warmup.pt"
    model = _tiny_checkpoint(ours, demo_data, truncated=False, depth_or_k=2, seed=1)
    _tiny_checkpoint(warmup, demo_data, truncated=True, depth_or_k=2, seed=0)
    repa = tmp_path / "repa.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {},
                "args": argparse.Namespace(model="SiT-Tiny/2", encoder_depth=3)}, str(repa))
    # --encoder-depth 3 (the projector's block) is not ours' 2: flags describe the REPA checkpoints only.
    repa_flags = ["--model", "SiT-Tiny/2", "--resolution", "64", "--num-classes", "10", "--encoder-depth", "3",
                  "--projector-embed-dims", "64"]
    common = ["--t", "0.3", "--layers", "1,4", "--batch-size", "64", "--num-workers", "0", "--device", "cpu"]
    # A REPA checkpoint names no data or teacher: the flags give them.
    from_repa = ck.main(["--ckpt", str(repa), "--labels", "sit", *repa_flags, "--data-dir", str(demo_data),
                         "--enc-type", "random-vit-tiny", *common, "--output-dir", str(tmp_path / "a")])
    from_ours = ck.main(["--ckpt", str(ours), "--labels", "sit", *common, "--output-dir", str(tmp_path / "b")])
    # Exact: the same weights, inputs and batches of 64 give the same float32 features and float64 metrics.
    assert from_repa["results"] == from_ours["results"] and sorted(from_repa["results"]["sit"]) == [1, 4]
    assert from_repa["settings"]["checkpoints"]["sit"]["format"] == "repa"
    # With one of ours in the same call: its settings name the data and teacher, and its own architecture stands.
    both = ck.main(["--ckpt", str(warmup), str(repa), "--labels", "warmup", "sit", *repa_flags, *common,
                    "--output-dir", str(tmp_path / "c")])
    assert both["results"]["sit"] == from_ours["results"]["sit"] and sorted(both["results"]["warmup"]) == [1]
    assert both["settings"]["checkpoints"]["warmup"]["model_args"]["encoder_depth"] == 2
    with pytest.raises(ValueError, match=r"repa.pt \['ema'\] does not match the model"):
        ck.main(["--ckpt", str(repa), "--data-dir", str(demo_data), "--enc-type", "random-vit-tiny", *common,
                 "--output-dir", str(tmp_path / "d")])  # no flags: args name the model, resolution 256 by default


def test_cli_input_errors(demo_data, tmp_path, capsys):
    warmup_path = tmp_path / "warmup.pt"
    _tiny_checkpoint(warmup_path, demo_data, truncated=True, depth_or_k=2, seed=0)
    common = ["--device", "cpu", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="--labels gives 2 name"):
        ck.main(["--ckpt", str(warmup_path), "--labels", "a", "b", *common])
    with pytest.raises(ValueError, match="distinct"):
        ck.main(["--ckpt", str(warmup_path), str(warmup_path), "--labels", "a", "a", *common])
    with pytest.raises(ValueError, match="has 2 blocks: none of --layers"):
        ck.main(["--ckpt", str(warmup_path), "--layers", "3-4", *common])
    (tmp_path / "afile").write_text("")
    for flag, bad in (("--t", "1.5"), ("--topk", "0"), ("--num-images", "3"), ("--outlier-quantile", "0"),
                      ("--batch-size", "0"), ("--num-workers", "-1"), ("--output-dir", str(tmp_path / "afile"))):
        with pytest.raises(SystemExit):  # argparse: the flag named, before any checkpoint is read
            ck.main(["--ckpt", str(warmup_path), *common, flag, bad])
        assert f"argument {flag}: " in capsys.readouterr().err
    with pytest.raises(ValueError, match="one teacher"):
        ck.main(["--ckpt", str(warmup_path), "--enc-type", "random-vit-tiny,random-vit-tiny", *common])
    not_a_checkpoint = tmp_path / "state_dict.pt"
    torch.save({"model": {}}, str(not_a_checkpoint))
    with pytest.raises(ValueError, match="has no 'ema' weights"):
        ck.main(["--ckpt", str(not_a_checkpoint), *common])
    assert not os.path.exists(tmp_path / "out")
