"""Inception-v3 as the 2015-12-05 TensorFlow graph that OpenAI's ADM evaluator runs, in the module tree of
pytorch-fid / torch-fidelity, so that their converted weight file pt_inception-2015-12-05-6726825d.pth loads strictly.
Where the TF graph differs from torchvision's Inception3 (convs without bias, BatchNorm eps 1e-3, average pools that
ignore the padding, Mixed_7c's max pool, a 1008-way fc), this follows the graph; `forward` also does its resize to
299 x 299 (TF1's legacy bilinear kernel) and scaling, and returns ADM's three tensors (InceptionFeatures).
"""
import math
import os
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from operations.checkpoint import load_checkpoint, load_state_dict_strict
from operations.cli import MissingInput, refusals
from operations.files import file_sha256

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# torch-fidelity ships the same converted network under this name; users of it often already have it cached.
WEIGHTS_FILENAME_TORCH_FIDELITY = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
RANDOM_WEIGHTS = "random"


def resize_bilinear_tf1(x: torch.Tensor, size: tuple) -> torch.Tensor:
    """TF1 ResizeBilinear with align_corners=False and no half-pixel centers, (N, C, H, W) float -> (N, C, h, w):
    source coordinate = dst * (in / out) with a float32 scale; lower = floor, upper = min(ceil, in - 1); the lerp
    along x first (top and bottom rows), then along y, as TF's kernel does."""
    out_h, out_w = size

    def source_taps(in_size: int, out_size: int):
        scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
        src = torch.arange(out_size, dtype=torch.float32) * scale
        src_floor = torch.floor(src)
        lower = src_floor.long().clamp(min=0)
        upper = torch.ceil(src).long().clamp(max=in_size - 1)
        return lower.to(x.device), upper.to(x.device), (src - src_floor).to(x.device)

    y_lo, y_hi, y_frac = source_taps(x.shape[-2], out_h)
    x_lo, x_hi, x_frac = source_taps(x.shape[-1], out_w)
    top_rows = x.index_select(-2, y_lo)
    bottom_rows = x.index_select(-2, y_hi)
    top_left, top_right = top_rows.index_select(-1, x_lo), top_rows.index_select(-1, x_hi)
    bottom_left, bottom_right = bottom_rows.index_select(-1, x_lo), bottom_rows.index_select(-1, x_hi)
    top = top_left + (top_right - top_left) * x_frac
    bottom = bottom_left + (bottom_right - bottom_left) * x_frac
    return top + (bottom - top) * y_frac[:, None]


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3_same(x):
    # TF's SAME average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/5c/5d): in -> 64 + 64 + 96 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3_same(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 288 -> 384 + 96 + 288 = 768 channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorized 7x7 convs (Mixed_6b..6e): 768 -> 4 * 192 channels."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward_with_branch1x1(self, x):
        """(N, 768, 17, 17) -> (block output (N, 768, 17, 17), branch1x1 output (N, 192, 17, 17))."""
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(_avg_pool_3x3_same(x))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], dim=1), branch1x1

    def forward(self, x):
        return self.forward_with_branch1x1(x)[0]


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 768 -> 320 + 192 + 768 = 1280 channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        branch7x7x3 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = conv(branch7x7x3)
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            branch7x7x3,
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks (Mixed_7b/7c): in -> 320 + 768 + 768 + 192 = 2048 channels. The TF
    graph's mixed_10 (Mixed_7c) pools with a max (`max_pool`), mixed_9 with an average."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3_same(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3),
            self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl),
            self.branch_pool(pooled),
        ], dim=1)


class InceptionFeatures(NamedTuple):
    pool: torch.Tensor     # (N, 2048) pool_3
    spatial: torch.Tensor  # (N, 2023) mixed_6/conv[..., :7] in H, W, C order
    logits: torch.Tensor   # (N, 1008) pool_3 @ fc.weight.T, no bias


class TFInceptionV3(nn.Module):
    """The 2015-12-05 TF Inception-v3 graph from its ExpandDims:0 input on (ADM's entry point)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        """images: (N, 3, H, W), any H, W, values in [0, 255] (uint8 or float) -> InceptionFeatures."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception input must be (N, 3, H, W) images, got shape {tuple(images.shape)}")
        x = resize_bilinear_tf1(images.float(), (INPUT_SIZE, INPUT_SIZE))
        x = (x - 128) * 0.0078125                                    # (N, 3, 299, 299) in [-1, 1)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)                 # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)                 # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))           # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))           # (N, 768, 17, 17)
        x, mixed_6_conv = self.Mixed_6d.forward_with_branch1x1(x)    # mixed_6_conv: (N, 192, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))                                    # (N, 2048)
        # TF's flatten of the NHWC tensor: the reference mu_s / sigma_s were computed in this order.
        spatial = mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)
        logits = pool @ self.fc.weight.t()
        return InceptionFeatures(pool, spatial, logits)


def random_init_(model: TFInceptionV3, seed: int = 0) -> TFInceptionV3:
    """Deterministic random weights (tests, demo): He-normal convs and non-trivial BatchNorm statistics, so that
    eps, pooling and branch order all change the outputs; a nonzero fc bias, so that using it would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=g)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.normal_(0.0, 0.1, generator=g)
                module.running_mean.normal_(0.0, 0.1, generator=g)
                module.running_var.uniform_(0.5, 1.5, generator=g)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 1.0 / math.sqrt(module.in_features), generator=g)
                module.bias.normal_(0.0, 1.0, generator=g)
    return model


def find_weights(weights: Optional[str]) -> str:
    """An explicit path, else the torch hub cache (checkpoints/<file name>), else an error saying what to get."""
    if weights is not None:
        if not os.path.isfile(weights):
            raise MissingInput(f"--inception-weights {weights}: file not found (expected {WEIGHTS_FILENAME}, "
                               f"the 2015-12-05 TF Inception-v3 converted to PyTorch, or '{RANDOM_WEIGHTS}')")
        return weights
    hub_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    for name in (WEIGHTS_FILENAME, WEIGHTS_FILENAME_TORCH_FIDELITY):
        path = os.path.join(hub_dir, name)
        if os.path.isfile(path):
            return path
    raise MissingInput(
        f"Inception weights not found. The ADM metrics need {WEIGHTS_FILENAME} (the 2015-12-05 TF Inception-v3 "
        f"converted to PyTorch, {WEIGHTS_URL}; torch-fidelity's {WEIGHTS_FILENAME_TORCH_FIDELITY} is the same "
        f"network). Nothing is downloaded at run time: put the file at {os.path.join(hub_dir, WEIGHTS_FILENAME)} "
        f"or pass --inception-weights PATH ('--inception-weights {RANDOM_WEIGHTS}' runs with meaningless random "
        f"weights, for tests and demos).")


def inception_weights_id(weights: Optional[str], seed: int = 0) -> str:
    """A string that identifies the network: 'random-seed<seed>' or 'sha256:<digest of the weight file>'."""
    if weights == RANDOM_WEIGHTS:
        return f"random-seed{seed}"
    return "sha256:" + file_sha256(find_weights(weights))


def load_inception(weights: Optional[str] = None, device="cpu", seed: int = 0) -> TFInceptionV3:
    """The evaluation network in eval mode, frozen, on `device`, from `weights`: a .pth path, None (torch hub cache)
    or 'random' (random_init_ with `seed`; meaningless metrics)."""
    model = TFInceptionV3()
    if weights == RANDOM_WEIGHTS:
        random_init_(model, seed)
    else:
        path = find_weights(weights)
        state_dict = load_checkpoint(path)
        # Files converted before BatchNorm counted batches lack num_batches_tracked; it plays no part in eval.
        for key, value in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                state_dict.setdefault(key, value)
        with refusals("--inception-weights"):
            load_state_dict_strict(model, state_dict, f"Inception weights {path}")
    return model.requires_grad_(False).eval().to(device)
