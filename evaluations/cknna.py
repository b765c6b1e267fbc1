"""Layer-wise alignment of SiT hidden states with a frozen teacher: CKNNA (Huh et al., 2024; paper section 4.4) and
linear CKA (Kornblith et al., 2019), as a JSON table and a PNG plot against the layer.

    python -m evaluations.cknna --ckpt exps/erw-warmup/checkpoints/last.pt REPA/last.pt --labels erw repa \
        --data-dir data/imagenet256-val --enc-type dinov2-vit-b --output-dir exps/cknna

The features (mean-pooled tokens, prepared as platonic-rep prepares them), CKNNA as platonic-rep's metrics.py
computes it (without its 1e-6 in the denominator), its derivation and every choice: docs/evaluation.md, "CKNNA".
"""
import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

if not __package__:  # started as a path: the repository root, where erw/ lives, is not importable
    sys.exit("error: run from the repository root as `python -m evaluations.cknna ...`")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from operations.files import atomic_write  # noqa: E402
from operations.cli import ArgumentParser, InvalidInput, number, refusals, run_main, writable  # noqa: E402
from erw.data import VAE_DOWNSAMPLING, ImageLatentDataset, sample_latents  # noqa: E402
from operations.checkpoint import REPA_MODEL_FLAG_DEFAULTS, WEIGHTS, add_repa_model_flags, load_model  # noqa: E402
from erw.generation import sample_generator  # noqa: E402
from erw.transport import PATH_TYPES, get_path  # noqa: E402
from models.encoders import load_teachers  # noqa: E402
from models.sit import SiT  # noqa: E402

DEFAULT_TOPK = 10               # appendix C.1 / REPA: k = 10
DEFAULT_NUM_IMAGES = 10_000     # appendix C.1: 10,000 random ImageNet validation images
DEFAULT_OUTLIER_QUANTILE = 0.95  # platonic-rep measure_alignment.py prepare_features(q=0.95)
DEFAULT_PATH_TYPE = "linear"    # SiT's default; a Phase-1 config has no path (it trains at t = 0 only)
KERNEL_BLOCK_ELEMENTS = 2 ** 25  # kernel rows are computed in blocks of about this many entries (256 MiB, float64)
QUANTILE_BLOCK_ELEMENTS = 2 ** 24  # torch.quantile's input size limit
JSON_NAME = "cknna.json"
PLOT_NAME = "cknna.png"


def prepare_features(feats: torch.Tensor, outlier_quantile: float = DEFAULT_OUTLIER_QUANTILE) -> torch.Tensor:
    """(n, D) features -> (n, D) float64: clamped at the mean per-row |.| quantile (1 = no clamp), then each row
    L2-normalised."""
    if not 0 < outlier_quantile <= 1:
        raise InvalidInput(f"--outlier-quantile must be in (0, 1], got {outlier_quantile}")
    feats = feats.double()
    if outlier_quantile < 1:
        rows_per_block = max(1, QUANTILE_BLOCK_ELEMENTS // feats.shape[1])
        row_quantiles = torch.cat([torch.quantile(block.abs(), outlier_quantile, dim=1)
                                   for block in feats.split(rows_per_block)])
        threshold = row_quantiles.mean()
        feats = feats.clamp(-threshold, threshold)
    return F.normalize(feats, dim=1)


def knn_indices(feats: torch.Tensor, topk: int) -> torch.Tensor:
    """(n, D) -> (n, topk) int64: row i holds the topk j != i with the largest <f_i, f_j>, largest first."""
    n = feats.shape[0]
    rows_per_block = max(1, KERNEL_BLOCK_ELEMENTS // n)
    blocks = []
    for start in range(0, n, rows_per_block):
        sims = feats[start:start + rows_per_block] @ feats.T             # (rows, n)
        rows = torch.arange(sims.shape[0], device=feats.device)
        sims[rows, rows + start] = -math.inf
        blocks.append(sims.topk(topk, dim=1).indices)
    return torch.cat(blocks)


def hsic_unbiased_sparse(rows: torch.Tensor, cols: torch.Tensor, a: torch.Tensor, b: torch.Tensor, n: int
                         ) -> torch.Tensor:
    """HSIC_u(A, B) (docs/evaluation.md), a 0-dim tensor, of n x n matrices that are zero except A[rows, cols] = a
    and B[rows, cols] = b: rows, cols (E,) distinct off-diagonal positions, a, b (E,) float64."""
    if n < 4:
        raise InvalidInput(f"the unbiased HSIC needs at least 4 samples, got {n}")
    trace_ab = torch.zeros((), dtype=a.dtype, device=a.device)
    if rows.numel():
        # tr(A B) = sum over (i, j) of A_ij B_ji: look up each entry's transposed position among the entries.
        keys = rows * n + cols
        order = torch.argsort(keys)
        sorted_keys = keys[order]
        transposed = cols * n + rows
        pos = torch.searchsorted(sorted_keys, transposed).clamp(max=keys.numel() - 1)
        found = sorted_keys[pos] == transposed
        trace_ab = (a[found] * b[order[pos[found]]]).sum()
    col_sums_a = torch.zeros(n, dtype=a.dtype, device=a.device).index_add_(0, cols, a)
    row_sums_b = torch.zeros(n, dtype=b.dtype, device=b.device).index_add_(0, rows, b)
    one_ab_one = (col_sums_a * row_sums_b).sum()
    return (trace_ab + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2 * one_ab_one / (n - 2)) / (n * (n - 3))


@dataclass
class KnnKernel:
    """Prepared features (n, D) float64, their kNN indices (n, k) and Align(K, K)."""
    feats: torch.Tensor
    knn: torch.Tensor
    self_alignment: float


def knn_alignment(feats_a: torch.Tensor, knn_a: torch.Tensor, feats_b: torch.Tensor, knn_b: torch.Tensor
                  ) -> torch.Tensor:
    """Align(K, L) = HSIC_u(alpha * K, alpha * L) with K, L the inner-product kernels of feats_a, feats_b (n, D*)."""
    n = feats_a.shape[0]
    in_both = (knn_a[:, :, None] == knn_b[:, None, :]).any(dim=2)       # (n, k): j in knn_K(i) and in knn_L(i)
    rows = torch.arange(n, device=knn_a.device)[:, None].expand_as(knn_a)[in_both]
    cols = knn_a[in_both]
    a = (feats_a[rows] * feats_a[cols]).sum(dim=1)                        # K_ij on the mask
    b = (feats_b[rows] * feats_b[cols]).sum(dim=1)                        # L_ij on the mask
    return hsic_unbiased_sparse(rows, cols, a, b, n)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features must be (n, D) matrices over the same n samples, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")


def knn_kernel(feats: torch.Tensor, topk: int) -> KnnKernel:
    """Features (n, D), already prepared -> the KnnKernel used by cknna_between (compute once, pair many times)."""
    n = feats.shape[0]
    if not 1 <= topk <= n - 1:
        raise InvalidInput(f"--topk must be in 1..n-1 = 1..{n - 1} for n = {n} samples, got {topk}")
    feats = feats.double()
    knn = knn_indices(feats, topk)
    return KnnKernel(feats, knn, float(knn_alignment(feats, knn, feats, knn)))


def cknna_between(p: KnnKernel, q: KnnKernel) -> float:
    """CKNNA of two KnnKernels over the same samples (NaN when Align(K,K) Align(L,L) <= 0)."""
    _check_pair(p.feats, q.feats)
    if p.knn.shape[1] != q.knn.shape[1]:
        raise ValueError(f"the two kernels use different k: {p.knn.shape[1]} and {q.knn.shape[1]}")
    denominator = p.self_alignment * q.self_alignment
    if not denominator > 0:
        return math.nan
    return float(knn_alignment(p.feats, p.knn, q.feats, q.knn)) / math.sqrt(denominator)


def cknna(x: torch.Tensor, y: torch.Tensor, topk: int = DEFAULT_TOPK) -> float:
    """CKNNA (docs/evaluation.md) of features x (n, Dx) and y (n, Dy), used as given (no preparation)."""
    _check_pair(x, y)
    return cknna_between(knn_kernel(x, topk), knn_kernel(y, topk))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) of x (n, Dx) and y (n, Dy), used as given (no preparation)."""
    _check_pair(x, y)
    x = x.double() - x.double().mean(dim=0)
    y = y.double() - y.double().mean(dim=0)
    denominator = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if not denominator > 0:
        return math.nan
    return float((x.T @ y).square().sum() / denominator)


class AnalysisItems(Dataset):
    """Items of a subset: (image uint8 (3, H, W), latent (C, h, w), noise (C, h, w), label int64), each latent and
    noise drawn from the image's own generator (seed, dataset index)."""

    def __init__(self, dataset: ImageLatentDataset, indices: Sequence[int], seed: int):
        self.dataset, self.indices, self.seed = dataset, list(indices), seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        image, moments, label = self.dataset[index]
        generator = sample_generator(self.seed, index)
        latent = sample_latents(moments[None], generator)[0]
        noise = torch.randn(latent.shape, generator=generator)
        return image, latent, noise, label


def select_indices(dataset_len: int, num_images: int, seed: int) -> List[int]:
    """Sorted dataset indices of a seeded random subset of min(num_images, dataset_len) images."""
    if num_images < 4:
        raise InvalidInput(f"--num-images must be at least 4 (the unbiased HSIC needs 4 samples), got {num_images}")
    if num_images >= dataset_len:
        return list(range(dataset_len))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(dataset_len, generator=generator)[:num_images].tolist())


def parse_layers(text: Optional[str]) -> Optional[List[int]]:
    """"1,2,8-12" -> [1, 2, 8, 9, 10, 11, 12]; None -> None (every block of each checkpoint)."""
    if text is None:
        return None
    layers = set()
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                first, last = part.split("-", 1)
                layers.update(range(int(first), int(last) + 1))
            elif part.strip():
                layers.add(int(part))
    except ValueError:
        raise InvalidInput(f"--layers must be comma-separated block numbers or ranges like 1,2,8-12, got {text!r}"
                           ) from None
    if not layers or min(layers) < 0:
        raise InvalidInput(f"--layers must name block numbers >= 0 (1-based; 0 = input tokens), got {text!r}")
    return sorted(layers)


@dataclass
class AnalysedCheckpoint:
    label: str
    path: str
    format: str                     # "erw" (ours) or "repa"
    model: SiT
    model_args: Dict
    config: Dict                    # our checkpoint's training config; {} for REPA's
    step: Optional[int]
    layers: List[int]
    path_type: str


def default_label(path: str) -> str:
    """exps/NAME/checkpoints/0400000.pt -> NAME/0400000; other paths -> the file name without extension."""
    parent = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    if os.path.basename(parent) == "checkpoints":
        return f"{os.path.basename(os.path.dirname(parent))}/{stem}"
    return stem


def setting_from_checkpoints(name: str, flag_value, checkpoints: List[AnalysedCheckpoint], flag: str):
    """The flag's value, else the value all checkpoint configs agree on (None where none has one)."""
    if flag_value is not None:
        return flag_value
    values = {c.path: c.config.get(name) for c in checkpoints if c.config.get(name) is not None}
    if len(set(values.values())) > 1:
        listing = "; ".join(f"{path}: {value}" for path, value in values.items())
        raise InvalidInput(f"the checkpoints were trained with different {name} ({listing}); choose one with {flag}")
    return next(iter(values.values()), None)


@torch.no_grad()
def extract_features(checkpoints: List[AnalysedCheckpoint], teacher: torch.nn.Module, loader: DataLoader,
                     num_images: int, t: float, device: torch.device):
    """One pass over the data -> (teacher features (n, D_teacher), {label: {layer: features (n, D)}}), float32 on the
    CPU, rows in the loader's order: the mean-pooled tokens described in the module docstring."""
    teacher_feats = None
    sit_feats = {c.label: {} for c in checkpoints}
    paths = {c.label: get_path(c.path_type) for c in checkpoints}
    start = 0
    for images, latents, noise, labels in tqdm(loader, desc="features", unit="batch"):
        stop = start + images.shape[0]
        pooled = teacher(images.to(device)).float().mean(dim=1).cpu()          # (B, D_teacher)
        if teacher_feats is None:
            teacher_feats = torch.empty(num_images, pooled.shape[1])
        teacher_feats[start:stop] = pooled
        latents, noise, labels = latents.to(device), noise.to(device), labels.to(device)
        times = torch.full((images.shape[0],), t, device=device)
        for c in checkpoints:
            x_t, _ = paths[c.label].interpolate(latents, noise, times)          # (B, C, h, w)
            hidden = c.model.forward_features(x_t, times, labels, c.layers)    # {layer: (B, T, D)}
            for layer, tokens in hidden.items():
                pooled = tokens.float().mean(dim=1).cpu()                       # (B, D)
                if layer not in sit_feats[c.label]:
                    sit_feats[c.label][layer] = torch.empty(num_images, pooled.shape[1])
                sit_feats[c.label][layer][start:stop] = pooled
        start = stop
    return teacher_feats, sit_feats


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", nargs="+", required=True,
                        help="one or more checkpoints of train_warmup.py / train.py, drawn on one plot")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one name per --ckpt for the table and plot (default: EXP/STEP from the path)")
    parser.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA weights (default) or the raw model")
    add_repa_model_flags(parser, "model (REPA-style checkpoints only, as in sample_ddp.py; our checkpoints carry "
                                 "their architecture)")
    parser.add_argument("--data-dir", default=None,
                        help="dataset folder (images/ + vae-sd/); default: the checkpoints' training data_dir")
    parser.add_argument("--enc-type", default=None,
                        help="one teacher, e.g. dinov2-vit-b; default: the checkpoints' training teacher")
    parser.add_argument("--enc-weights", default=None,
                        help="local teacher weight file; default: the checkpoints' enc_weights, else the local cache")
    parser.add_argument("--layers", default=None,
                        help="SiT blocks to analyse, 1-based, e.g. 1,2,8-12 (default: every block; blocks a "
                             "checkpoint lacks, as in a Phase-1 one, are skipped for it)")
    parser.add_argument("--t", type=number("[0, 1]", float), default=0.0,
                        help="diffusion time of the SiT input (0 = clean latents, 1 = noise)")
    parser.add_argument("--path-type", choices=PATH_TYPES, default=None,
                        help=f"interpolant for t > 0; default: each checkpoint's, else {DEFAULT_PATH_TYPE}")
    parser.add_argument("--topk", type=number("[1, inf)"), default=DEFAULT_TOPK,
                        help="k of the nearest-neighbour mask (below the number of images)")
    parser.add_argument("--num-images", type=number("[4, inf)"), default=DEFAULT_NUM_IMAGES,
                        help="images in the seeded random subset (all of them when the folder holds fewer)")
    parser.add_argument("--outlier-quantile", type=number("(0, 1]", float), default=DEFAULT_OUTLIER_QUANTILE,
                        help="clamp features at this mean per-row |.| quantile before normalising (1 = no clamp)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the subset and each image's latent and noise")
    parser.add_argument("--batch-size", type=number("[1, inf)"), default=128, help="images per SiT and teacher call")
    parser.add_argument("--num-workers", type=number("[0, inf)"), default=4, help="data loader worker processes")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: the GPU when there is one")
    parser.add_argument("--output-dir", default="exps/cknna", type=writable(folder=True),
                        help=f"writes {JSON_NAME} (table and settings) and {PLOT_NAME} here")
    return parser


def load_checkpoints(paths: Sequence[str], labels: Optional[Sequence[str]], weights: str,
                     layers: Optional[List[int]], path_type: Optional[str],
                     repa_model_flags: Optional[Dict] = None) -> List[AnalysedCheckpoint]:
    if labels is None:
        labels = [default_label(p) for p in paths]
    elif len(labels) != len(paths):
        raise InvalidInput(f"--labels gives {len(labels)} name(s) for {len(paths)} --ckpt file(s)")
    if len(set(labels)) != len(labels):
        raise InvalidInput(f"labels must be distinct, got {list(labels)} (name them with --labels)")
    checkpoints = []
    for path, label in zip(paths, labels):
        model, info = load_model(path, weights, repa_model_flags, flags_for_ours=False)
        config = info["config"]
        available = list(range(1, len(model.blocks) + 1)) if layers is None else \
            [layer for layer in layers if layer <= len(model.blocks)]
        if not available:
            raise InvalidInput(f"{path} has {len(model.blocks)} blocks: none of --layers {layers} exists there")
        if layers is not None and len(available) < len(layers):
            print(f"{label}: {path} has {len(model.blocks)} blocks; layers {available[0]}..{available[-1]} of "
                  f"--layers are analysed there")
        checkpoints.append(AnalysedCheckpoint(label, path, info["format"], model, info["model_args"], config,
                                              info["step"], available,
                                              path_type or config.get("path_type") or DEFAULT_PATH_TYPE))
    return checkpoints


def alignment_figure(results: Dict[str, Dict[int, Dict[str, float]]], title: str):
    """CKNNA and linear CKA against the layer, one line per checkpoint (a matplotlib Figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(figure)
    for axis, metric, name in zip(figure.subplots(1, 2), ("cknna", "cka"), ("CKNNA", "linear CKA")):
        for label, by_layer in results.items():
            layers = sorted(by_layer)
            axis.plot(layers, [by_layer[layer][metric] for layer in layers], marker="o", label=label)
        axis.set_xlabel("SiT layer (output of block l, 1-based)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole blocks
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def main(argv=None) -> dict:
    """Run the analysis; returns what it writes to cknna.json (layers as int keys)."""
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("--device cuda: no CUDA GPU is visible")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    repa_model_flags = {name: getattr(args, name) for name in REPA_MODEL_FLAG_DEFAULTS}
    checkpoints = load_checkpoints(args.ckpt, args.labels, args.weights, parse_layers(args.layers), args.path_type,
                                   repa_model_flags)

    data_dir = setting_from_checkpoints("data_dir", args.data_dir, checkpoints, "--data-dir")
    if data_dir is None:
        raise InvalidInput("no --data-dir given and the checkpoints' configs name none")
    with refusals("--data-dir"):
        dataset = ImageLatentDataset(data_dir)
    for c in checkpoints:
        side = c.model.grid_size * c.model.patch_size * VAE_DOWNSAMPLING
        if side != dataset.resolution:
            raise InvalidInput(f"{c.path} models {side}px images but {data_dir} holds {dataset.resolution}px ones")
        if dataset.num_classes > c.model.num_classes:
            raise InvalidInput(f"{data_dir} has labels up to {dataset.num_classes - 1} but {c.path} knows "
                               f"{c.model.num_classes} classes")
    enc_type = setting_from_checkpoints("enc_type", args.enc_type, checkpoints, "--enc-type")
    if enc_type is None or "," in enc_type:
        raise InvalidInput(f"CKNNA compares with one teacher: give --enc-type with one name (checkpoints: {enc_type})")
    enc_weights = setting_from_checkpoints("enc_weights", args.enc_weights, checkpoints, "--enc-weights")
    with refusals("--enc-type"):
        teachers = load_teachers(enc_type, dataset.resolution, enc_weights)
    teacher = teachers[0].to(device)

    indices = select_indices(len(dataset), args.num_images, args.seed)
    if len(indices) < args.num_images:
        print(f"{data_dir} holds {len(dataset)} images (< --num-images {args.num_images}): using all of them")
    for c in checkpoints:
        c.model.to(device)
    loader = DataLoader(AnalysisItems(dataset, indices, args.seed), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    teacher_feats, sit_feats = extract_features(checkpoints, teacher, loader, len(indices), args.t, device)

    target = knn_kernel(prepare_features(teacher_feats.to(device), args.outlier_quantile), args.topk)
    results = {c.label: {} for c in checkpoints}
    pairs = [(c.label, layer) for c in checkpoints for layer in c.layers]
    for label, layer in tqdm(pairs, desc="CKNNA", unit="layer"):
        feats = prepare_features(sit_feats[label].pop(layer).to(device), args.outlier_quantile)
        results[label][layer] = {"cknna": cknna_between(knn_kernel(feats, args.topk), target),
                                 "cka": linear_cka(feats, target.feats)}

    settings = {
        "checkpoints": {c.label: {"path": c.path, "format": c.format, "step": c.step, "layers": c.layers,
                                  "path_type": c.path_type, "model_args": c.model_args} for c in checkpoints},
        "weights": args.weights, "data_dir": str(data_dir), "dataset_size": len(dataset),
        "num_images": len(indices), "num_images_requested": args.num_images, "seed": args.seed,
        "enc_type": enc_type, "enc_weights": enc_weights, "t": args.t, "topk": args.topk,
        "outlier_quantile": args.outlier_quantile,
        "sit_input": "x_t on the checkpoint's path from a latent sampled from the stored posterior, class = label",
        "pooling": "mean over tokens (SiT hidden state after the block; teacher patch tokens)",
        "device": str(device),
    }
    output = {"settings": settings, "results": results}
    json_path = os.path.join(args.output_dir, JSON_NAME)
    atomic_write(json_path, lambda f: f.write(json.dumps(output, indent=2, allow_nan=True).encode()))
    figure = alignment_figure(results, f"{enc_type}, t = {args.t}, n = {len(indices)}, k = {args.topk}")
    plot_path = os.path.join(args.output_dir, PLOT_NAME)
    atomic_write(plot_path, lambda f: figure.savefig(f, format="png", dpi=120))

    print(f"{'label':<24} {'layer':>5} {'CKNNA':>8} {'CKA':>8}")
    for label, by_layer in results.items():
        for layer, values in by_layer.items():
            print(f"{label:<24} {layer:>5} {values['cknna']:>8.4f} {values['cka']:>8.4f}")
    print(f"wrote {json_path} and {plot_path}")
    return output


if __name__ == "__main__":
    run_main(main)
