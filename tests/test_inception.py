"""evaluations/inception.py: the TF1 resize, the weight-file layout, and the features against second implementations
(torchvision's Inception3 with the TF graph's pools patched in, always; torch-fidelity's, when installed)."""
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models import inception as tv_inception

from evaluations.inception import (WEIGHTS_FILENAME, find_weights, load_inception, random_init_,
                                   resize_bilinear_tf1, TFInceptionV3)


def tf1_resize_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) of one (H, W, C) image, in float32
    numpy, following the kernel's per-row / per-column weight computation."""
    in_h, in_w = image.shape[:2]
    image = image.astype(np.float32)
    scale_y = np.float32(in_h) / np.float32(out_h)
    scale_x = np.float32(in_w) / np.float32(out_w)
    in_x = np.arange(out_w, dtype=np.float32) * scale_x
    x0 = np.floor(in_x).astype(np.int64)
    x1 = np.minimum(np.ceil(in_x).astype(np.int64), in_w - 1)
    dx = (in_x - np.floor(in_x)).astype(np.float32)[:, None]
    out = np.empty((out_h, out_w, image.shape[2]), np.float32)
    for y in range(out_h):
        in_y = np.float32(y) * scale_y
        y0, y1 = int(np.floor(in_y)), min(int(np.ceil(in_y)), in_h - 1)
        dy = np.float32(in_y - np.floor(in_y))
        top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * dx
        bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * dx
        out[y] = top + (bottom - top) * dy
    return out


def _nchw(images_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("in_size,out_size", [((13, 7), (41, 29)),      # up, odd
                                              ((97, 61), (31, 22)),     # down, odd
                                              ((37, 53), (299, 299)),   # up to the Inception size
                                              ((301, 517), (299, 299))])  # down to the Inception size
def test_resize_matches_tf1_formula(in_size, out_size):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2,) + in_size + (3,)).astype(np.uint8)
    ours = resize_bilinear_tf1(_nchw(images), out_size).permute(0, 2, 3, 1).numpy()
    reference = np.stack([tf1_resize_reference(image, *out_size) for image in images])
    # Both evaluate the TF1 formula in float32 on values <= 255: a handful of roundings of ulp(255) = 1.5e-5 each,
    # and weights dx, dy that may differ by an ulp (x 255 = 1.5e-5); atol=1e-4 covers ~6 such ulps. The
    # half-pixel kernel below differs by > 1.
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)
    # Not the half-pixel kernel of F.interpolate (what pytorch-fid uses), which the TF graph does not run.
    half_pixel = F.interpolate(_nchw(images), size=out_size, mode="bilinear", align_corners=False)
    assert (half_pixel.permute(0, 2, 3, 1).numpy() - reference).__abs__().max() > 1.0


def test_resize_to_same_size_is_identity():
    images = np.random.default_rng(1).integers(0, 256, (1, 299, 299, 3)).astype(np.uint8)
    out = resize_bilinear_tf1(_nchw(images), (299, 299))
    assert torch.equal(out, _nchw(images))  # scale 1: dx = dy = 0 exactly, a + (b - a) * 0 = a


def test_resize_matches_torch_fidelity():
    tf_compat = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")
    x = torch.randint(0, 256, (2, 3, 45, 71), generator=torch.Generator().manual_seed(2)).float()
    expected = tf_compat.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    torch.testing.assert_close(resize_bilinear_tf1(x, (299, 299)), expected, rtol=0, atol=1e-4)  # as above


#################################################################################
#                              The weight file                                  #
#################################################################################

def _conv_shapes():
    """[(module path, conv weight shape)] of pt_inception-2015-12-05-6726825d.pth, written out from the file's
    documented layout (spec section 3.2), not from the model."""
    convs = [("Conv2d_1a_3x3", (32, 3, 3, 3)), ("Conv2d_2a_3x3", (32, 32, 3, 3)), ("Conv2d_2b_3x3", (64, 32, 3, 3)),
             ("Conv2d_3b_1x1", (80, 64, 1, 1)), ("Conv2d_4a_3x3", (192, 80, 3, 3))]
    for name, cin, pool_features in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs += [(f"{name}.branch1x1", (64, cin, 1, 1)), (f"{name}.branch5x5_1", (48, cin, 1, 1)),
                  (f"{name}.branch5x5_2", (64, 48, 5, 5)), (f"{name}.branch3x3dbl_1", (64, cin, 1, 1)),
                  (f"{name}.branch3x3dbl_2", (96, 64, 3, 3)), (f"{name}.branch3x3dbl_3", (96, 96, 3, 3)),
                  (f"{name}.branch_pool", (pool_features, cin, 1, 1))]
    convs += [("Mixed_6a.branch3x3", (384, 288, 3, 3)), ("Mixed_6a.branch3x3dbl_1", (64, 288, 1, 1)),
              ("Mixed_6a.branch3x3dbl_2", (96, 64, 3, 3)), ("Mixed_6a.branch3x3dbl_3", (96, 96, 3, 3))]
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs += [(f"{name}.branch1x1", (192, 768, 1, 1)), (f"{name}.branch7x7_1", (c7, 768, 1, 1)),
                  (f"{name}.branch7x7_2", (c7, c7, 1, 7)), (f"{name}.branch7x7_3", (192, c7, 7, 1)),
                  (f"{name}.branch7x7dbl_1", (c7, 768, 1, 1)), (f"{name}.branch7x7dbl_2", (c7, c7, 7, 1)),
                  (f"{name}.branch7x7dbl_3", (c7, c7, 1, 7)), (f"{name}.branch7x7dbl_4", (c7, c7, 7, 1)),
                  (f"{name}.branch7x7dbl_5", (192, c7, 1, 7)), (f"{name}.branch_pool", (192, 768, 1, 1))]
    convs += [("Mixed_7a.branch3x3_1", (192, 768, 1, 1)), ("Mixed_7a.branch3x3_2", (320, 192, 3, 3)),
              ("Mixed_7a.branch7x7x3_1", (192, 768, 1, 1)), ("Mixed_7a.branch7x7x3_2", (192, 192, 1, 7)),
              ("Mixed_7a.branch7x7x3_3", (192, 192, 7, 1)), ("Mixed_7a.branch7x7x3_4", (192, 192, 3, 3))]
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs += [(f"{name}.branch1x1", (320, cin, 1, 1)), (f"{name}.branch3x3_1", (384, cin, 1, 1)),
                  (f"{name}.branch3x3_2a", (384, 384, 1, 3)), (f"{name}.branch3x3_2b", (384, 384, 3, 1)),
                  (f"{name}.branch3x3dbl_1", (448, cin, 1, 1)), (f"{name}.branch3x3dbl_2", (384, 448, 3, 3)),
                  (f"{name}.branch3x3dbl_3a", (384, 384, 1, 3)), (f"{name}.branch3x3dbl_3b", (384, 384, 3, 1)),
                  (f"{name}.branch_pool", (192, cin, 1, 1))]
    return convs


def _weight_file_state_dict(with_num_batches_tracked: bool):
    g = torch.Generator().manual_seed(3)
    state = {}
    for path, shape in _conv_shapes():
        state[f"{path}.conv.weight"] = torch.randn(shape, generator=g)
        for stat in ("weight", "bias", "running_mean"):
            state[f"{path}.bn.{stat}"] = torch.randn(shape[0], generator=g)
        state[f"{path}.bn.running_var"] = torch.rand(shape[0], generator=g) + 0.5
        if with_num_batches_tracked:
            state[f"{path}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g)
    state["fc.bias"] = torch.randn(1008, generator=g)
    return state


@pytest.mark.parametrize("with_num_batches_tracked", [False, True])
def test_weight_file_layout_loads_strictly(tmp_path, with_num_batches_tracked):
    state = _weight_file_state_dict(with_num_batches_tracked)
    assert len(_conv_shapes()) == 94 and len(state) == (94 * 6 if with_num_batches_tracked else 94 * 5) + 2
    path = tmp_path / WEIGHTS_FILENAME
    torch.save(state, path)
    loaded = load_inception(str(path)).state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_weight_file_with_wrong_shape_is_refused(tmp_path):
    state = _weight_file_state_dict(False)
    state["Mixed_6d.branch1x1.conv.weight"] = torch.zeros(192, 768, 3, 3)
    del state["fc.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"(?s)bad\.pth.*fc\.bias.*Mixed_6d\.branch1x1\.conv\.weight"):
        load_inception(str(tmp_path / "bad.pth"))


def test_weights_are_found_in_the_hub_cache_or_named_in_the_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=rf"{WEIGHTS_FILENAME}.*--inception-weights"):
        find_weights(None)
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        find_weights(str(tmp_path / "nope.pth"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / WEIGHTS_FILENAME).write_bytes(b"")
    assert find_weights(None) == str(tmp_path / "hub" / "checkpoints" / WEIGHTS_FILENAME)


#################################################################################
#                        Features vs second implementations                     #
#################################################################################

@pytest.fixture(scope="module")
def shared():
    """Random weights, two test images, and our features for them (computed once: ~1 s/image on CPU)."""
    model = load_inception("random", seed=7)
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (2, 37, 53, 3)).astype(np.uint8)  # NHWC, as in the .npz files
    with torch.no_grad():
        ours = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    return types.SimpleNamespace(model=model, images=images, ours=ours)


def _assert_features_close(ours, pool, spatial, logits):
    # Two float32 implementations of a 94-conv network. Against a float64 forward of the torchvision tree, each
    # feature set is off by <= 2e-6 of its largest entry (eps32 times ~20: sums of up to 2048 x 9 products per
    # conv, BN folded or not, in other orders), so rtol=1e-4 with atol = 1e-4 of the largest entry is ~50x the
    # float32 error (measured ratio 0.017); a swapped branch, a wrong pool or padding changes features by O(1).
    for name, mine, theirs in (("pool", ours.pool, pool), ("spatial", ours.spatial, spatial),
                               ("logits", ours.logits, logits)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()), msg=name)


def _spatial_from_branch1x1(branch1x1_out: torch.Tensor) -> torch.Tensor:
    """mixed_6/conv[..., :7] of the TF graph, flattened NHWC: (N, 192, 17, 17) -> (N, 2023)."""
    return branch1x1_out[:, :7].permute(0, 2, 3, 1).reshape(len(branch1x1_out), -1)


def test_features_match_torchvision_inception_with_tf_pools(shared, monkeypatch):
    """torchvision's Inception3 (pytorch-fid's tree) carries our weights strictly; its average pools are made to
    exclude the padding and Mixed_7c's pool branch is made a max pool, as in the TF graph."""
    reference = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                                num_classes=1008, transform_input=False)
    reference.load_state_dict(shared.model.state_dict(), strict=True)
    reference.eval()
    pool_mode = {"max": False}

    def tf_avg_pool2d(x, kernel_size, stride=None, padding=0, **kwargs):
        if pool_mode["max"]:
            return F.max_pool2d(x, kernel_size, stride, padding)
        return F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=False)

    functional = {name: getattr(F, name) for name in dir(F) if not name.startswith("_")}
    monkeypatch.setattr(tv_inception, "F", types.SimpleNamespace(**{**functional, "avg_pool2d": tf_avg_pool2d}))
    captured = {}
    reference.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("b1", o))
    resized = np.stack([tf1_resize_reference(image, 299, 299) for image in shared.images])
    x = (_nchw(resized) - 128) / 128
    with torch.no_grad():
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b"):
            x = getattr(reference, name)(x)
        pool_mode["max"] = True
        x = reference.Mixed_7c(x)
        pool = torch.flatten(reference.avgpool(x), 1)
        logits = reference.fc(pool) - reference.fc.bias
    _assert_features_close(shared.ours, pool, _spatial_from_branch1x1(captured["b1"]), logits)


def test_features_match_torch_fidelity(shared, tmp_path):
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    torch.save(shared.model.state_dict(), tmp_path / "weights.pth")
    reference = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                     feature_extractor_weights_path=str(tmp_path / "weights.pth"))
    captured = {}
    reference.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("b1", o.clone()))
    with torch.no_grad():
        pool, logits = reference(torch.from_numpy(shared.images).permute(0, 3, 1, 2).contiguous())
    _assert_features_close(shared.ours, pool, _spatial_from_branch1x1(captured["b1"]), logits)


def test_random_init_is_deterministic_and_seeded():
    a, b, c = TFInceptionV3(), TFInceptionV3(), TFInceptionV3()
    random_init_(a, seed=1)
    random_init_(b, seed=1)
    random_init_(c, seed=2)
    assert torch.equal(a.Mixed_6d.branch1x1.conv.weight, b.Mixed_6d.branch1x1.conv.weight)
    assert not torch.equal(a.Mixed_6d.branch1x1.conv.weight, c.Mixed_6d.branch1x1.conv.weight)


def test_input_of_wrong_shape_is_refused(shared):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        shared.model(torch.zeros(1, 32, 32, 3))
