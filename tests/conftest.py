"""Test-wide settings: offline logging, a fixed small thread count (not for the GPU tests). The repository root is
importable as pytest runs from it (README's `python -m pytest -q tests`)."""
import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import pytest  # noqa: E402

TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")


def pytest_configure(config):
    # tests/test_gpu.py: GPU minutes, opt-in with `pytest -m gpu`, skipped without CUDA.
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; opt-in with `pytest -m gpu`")
    # The CPU suite runs on 2 cores (CI), where more threads than cores only add switching; the GPU tests keep every
    # core of their host for data loading and the evaluator's CPU work.
    if "gpu" not in (config.getoption("markexpr") or ""):
        torch.set_num_threads(2)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The generated demo dataset (10 classes x 16 images, 64 px, random tiny VAE), made once per session."""
    from preprocessing import dataset_tools
    root = tmp_path_factory.mktemp("demo-data")
    dataset_tools.main(["make-demo", "--dest", str(root), "--images-per-class", "16", "--vae", "random-tiny"])
    return root


def tiny_args(demo_data, output_dir, *extra):
    """Command line for an entry point on configs/tiny.yaml, reading demo_data and writing under output_dir, with the
    random tiny teacher (unit tests do not depend on the demo's trained components)."""
    return ["--config", TINY_CONFIG, "--data-dir", str(demo_data), "--output-dir", str(output_dir),
            "--enc-type", "random-vit-tiny", *extra]


@pytest.fixture
def test_size_dinov2(tmp_path, monkeypatch):
    """FD-DINOv2 on a 48-wide, 2-block ViT-L/14 layout, and such a random model saved as DINOv2 publishes it."""
    from evaluations import fd_dinov2
    from tests.test_encoders import OfficialDinoV2
    monkeypatch.setattr(fd_dinov2, "TEST_SIZE", dict(embed_dim=48, depth=2, num_heads=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = OfficialDinoV2(dim=48, depth=2, heads=2).eval()
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(model.state_dict(), path)
    return model, str(path)
