"""The demo's trained components (assets/demo): what each must do on demo images none of them was trained on, the
metrics built on the classifier, and the script that trains them (re-run briefly)."""

import numpy as np
import pytest
import torch

from evaluations.demo_metrics import classify, demo_metrics, load_classifier
from models.encoders import DEMO_TEACHER, build_teacher
from models.vae import DEMO_VAE, decode_latents, encode_moments, load_vae, vae_to_model_latents
from preprocessing.dataset_tools import demo_image

# The components were trained on demo_image seeds 1 (train) and 1001 (their held-out check); the demo's data is
# seed 0. These tests draw from seeds none of that used.
TEST_SEED, PROBE_SEED = 7, 8


def images(count, seed):
    """uint8 (count, 64, 64, 3) demo images and their labels (i mod 10)."""
    return np.stack([demo_image(i % 10, i, seed, 64) for i in range(count)]), np.arange(count) % 10


def test_demo_vae_reconstructs_held_out_shapes():
    vae = load_vae(DEMO_VAE)
    x, _ = images(100, TEST_SEED)
    moments = encode_moments(vae, torch.from_numpy(x).permute(0, 3, 1, 2))
    latents = vae_to_model_latents(moments[:, :4])
    decoded = decode_latents(vae, latents).numpy()
    mse = ((decoded.astype(np.float64) - x.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(255.0 ** 2 / mse)
    assert psnr.mean() >= 22.0, psnr.mean()
    # Latents at SD's scale: the training code multiplies by 0.18215 and expects about unit spread.
    assert 0.7 < float(latents.std()) < 1.3


def _ridge_probe_accuracy(train_x, train_y, test_x, test_y):
    """Held-out accuracy of a least-squares linear classifier onto one-hot labels (numpy, float64)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a = np.hstack([(train_x - mean) / std, np.ones((len(train_x), 1))])
    b = np.hstack([(test_x - mean) / std, np.ones((len(test_x), 1))])
    w = np.linalg.solve(a.T @ a + 1e-2 * np.eye(a.shape[1]), a.T @ np.eye(10)[train_y])
    return float(((b @ w).argmax(1) == test_y).mean())


def test_demo_teacher_patch_tokens_carry_the_class():
    teacher = build_teacher(DEMO_TEACHER, 64)

    def pooled(x):
        with torch.no_grad():
            return teacher(torch.from_numpy(x).permute(0, 3, 1, 2)).mean(1).double().numpy()

    (train_x, train_y), (test_x, test_y) = images(300, PROBE_SEED), images(200, TEST_SEED)
    assert _ridge_probe_accuracy(pooled(train_x), train_y, pooled(test_x), test_y) >= 0.9
    assert teacher(torch.from_numpy(test_x[:2]).permute(0, 3, 1, 2)).shape == (2, 16, 96)  # = SiT-Tiny/2's tokens


def test_demo_classifier_and_metrics():
    classifier = load_classifier()
    x, y = images(200, TEST_SEED)
    predicted, features = classify(classifier, x)
    assert (predicted == y).mean() >= 0.95 and features.shape == (200, 128)
    reference, _ = images(200, PROBE_SEED)
    right = demo_metrics(reference, x, y, classifier)
    wrong = demo_metrics(reference, x, (y + 1) % 10, classifier)
    assert right["class_accuracy"] == pytest.approx((predicted == y).mean())
    assert wrong["class_accuracy"] == pytest.approx((predicted == (y + 1) % 10).mean()) and \
        wrong["class_accuracy"] < 0.05
    # Two draws of the same distribution are close in FD-demo; one class alone is far from all ten.
    one_class = demo_metrics(reference, x[y == 3], y[y == 3], classifier)
    assert right["fd_demo"] < 0.1 * one_class["fd_demo"]


def test_the_training_script_runs_and_its_outputs_load(tmp_path):
    """preprocessing/train_demo_components.py at 1/400 of its steps: every file appears and loads with the loaders the
    demo uses (strict loads)."""
    from preprocessing import train_demo_components
    train_demo_components.main(["--out", str(tmp_path), "--steps-scale", "0.0025", "--images-per-class", "3",
                           "--held-out-per-class", "2"])
    vae = load_vae(str(tmp_path / "vae"))
    assert encode_moments(vae, torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, 8, 8, 8)
    teacher = build_teacher(DEMO_TEACHER, 64, str(tmp_path / "teacher.safetensors"))
    assert teacher(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, 16, 96)
    classify(load_classifier(str(tmp_path / "classifier.safetensors")), np.zeros((1, 64, 64, 3), np.uint8))
