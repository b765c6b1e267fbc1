"""Class accuracy and FD-demo of demo samples, from the small classifier trained on the demo images
(assets/demo/classifier.safetensors, made by preprocessing/train_demo_components.py): the share of samples it assigns
to the class they were generated for (chance 10%), and the Frechet distance between its pooled features (128-d) of
the samples and of the reference images, a demo-only number, NOT ImageNet FID (docs/demo.md).

    python -m evaluations.demo_metrics data/demo/reference.npz samples/<run>.npz [--json demo_metrics.json]
"""
import json
import os
import sys
from typing import Dict, Optional

if not __package__:  # started as a path: the repository root, where erw/ lives, is not importable
    sys.exit("error: run from the repository root as `python -m evaluations.demo_metrics ...`")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from operations.checkpoint import load_state_dict_strict  # noqa: E402
from operations.cli import ArgumentParser, InvalidInput, MissingInput, refusals, run_main, writable  # noqa: E402
from operations.files import atomic_write  # noqa: E402
from evaluations.evaluator import compute_statistics, frechet_distance  # noqa: E402

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo")
CLASSIFIER_WEIGHTS = os.path.join(ASSETS_DIR, "classifier.safetensors")
DEMO_RESOLUTION = 64
DEMO_NUM_CLASSES = 10
FEATURE_DIM = 128


class DemoClassifier(nn.Module):
    """uint8 images (N, 3, 64, 64) -> (logits (N, 10), pooled features (N, 128)): three stride-2 conv stages,
    global average pooling, a linear head. Small enough to train in a minute on a CPU."""

    def __init__(self, num_classes: int = DEMO_NUM_CLASSES, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, FEATURE_DIM):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, images: torch.Tensor):
        x = images.float() / 127.5 - 1.0
        pooled = self.features(x).mean(dim=(2, 3))
        return self.head(pooled), pooled


def load_classifier(path: str = CLASSIFIER_WEIGHTS) -> DemoClassifier:
    """The trained demo classifier, frozen, loaded strictly from a safetensors file."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise MissingInput(f"demo classifier weights not found: {path} (they ship with the repository; "
                           "rebuild them with `python -m preprocessing.train_demo_components`)")
    model = DemoClassifier()
    state_dict = load_file(path)
    with refusals("--classifier"):
        load_state_dict_strict(model, state_dict, f"demo classifier {path}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classify(model: DemoClassifier, images: np.ndarray, batch_size: int = 256):
    """uint8 (N, H, W, 3) -> (predicted classes (N,), pooled features float64 (N, 128))."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (DEMO_RESOLUTION, DEMO_RESOLUTION, 3):
        raise InvalidInput(f"the demo classifier reads uint8 (N, {DEMO_RESOLUTION}, {DEMO_RESOLUTION}, 3) images, "
                           f"got {images.dtype} {images.shape}")
    predictions, features = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2)
        logits, pooled = model(batch)
        predictions.append(logits.argmax(dim=1).numpy())
        features.append(pooled.double().numpy())
    return np.concatenate(predictions), np.concatenate(features)


def demo_metrics(reference: np.ndarray, samples: np.ndarray, sample_labels: np.ndarray,
                 model: Optional[DemoClassifier] = None) -> Dict[str, float]:
    """{"class_accuracy", "fd_demo", "num_samples"} (the module's docstring)."""
    if len(sample_labels) != len(samples):
        raise InvalidInput(f"{len(samples)} samples but {len(sample_labels)} labels")
    model = model or load_classifier()
    predicted, sample_features = classify(model, samples)
    _, reference_features = classify(model, reference)
    mu_s, sigma_s = compute_statistics(sample_features)
    mu_r, sigma_r = compute_statistics(reference_features)
    return {"class_accuracy": float((predicted == sample_labels).mean()),
            "fd_demo": float(frechet_distance(mu_s, sigma_s, mu_r, sigma_r)),
            "num_samples": int(len(samples))}


def _read_npz(path: str, with_labels: bool):
    if not os.path.isfile(path):
        raise MissingInput(f"{path}: no such .npz file")
    with np.load(path) as data:
        if "arr_0" not in data:
            raise InvalidInput(f"{path} has no arr_0 (images)")
        if with_labels and "arr_1" not in data:
            raise InvalidInput(f"{path} has no arr_1: the labels the samples were generated for (sample_ddp.py writes "
                               "them)")
        return data["arr_0"], (data["arr_1"] if with_labels else None)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("ref_batch", help="reference .npz of demo images (arr_0 uint8 N x 64 x 64 x 3)")
    parser.add_argument("sample_batch", help="sample .npz from sample_ddp.py (arr_0 images, arr_1 labels)")
    parser.add_argument("--json", default=None, type=writable(),
                        help="also write the metrics to this file (default: none)")
    parser.add_argument("--classifier", default=CLASSIFIER_WEIGHTS, help="classifier weights")
    return parser


def main(argv=None) -> Dict[str, float]:
    args = build_parser().parse_args(argv)
    reference, _ = _read_npz(args.ref_batch, with_labels=False)
    samples, labels = _read_npz(args.sample_batch, with_labels=True)
    metrics = demo_metrics(reference, samples, labels, load_classifier(args.classifier))
    print(f"class accuracy: {metrics['class_accuracy']:.1%} of {metrics['num_samples']} samples (chance "
          f"{1 / DEMO_NUM_CLASSES:.0%})")
    print(f"FD-demo (demo classifier features, not ImageNet FID): {metrics['fd_demo']:.3f}")
    if args.json:
        atomic_write(args.json, lambda f: f.write((json.dumps(metrics, indent=1) + "\n").encode()))
    return metrics


if __name__ == "__main__":
    run_main(main)
