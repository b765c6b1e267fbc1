"""ADM's evaluation suite (guided-diffusion/evaluations/evaluator.py) in PyTorch: Inception Score, FID, sFID,
precision and recall of a sample batch against a reference batch, with ADM's numbers and output lines, from .npz
image batches (arr_0 uint8 (N, H, W, 3)).

    python -m evaluations.evaluator VIRTUAL_imagenet256_labeled.npz samples.npz --json metrics.json

What is ADM's on purpose, what is refused, and the one deliberate difference: docs/evaluation.md.
"""
import argparse
import functools
import hashlib
import json
import os
import sys
import time
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterator, Optional, Tuple

if not __package__:  # started as a path: the repository root, where erw/ lives, is not importable
    sys.exit("error: run from the repository root as `python -m evaluations.evaluator ...`")

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from erw.precision import fp32_precision_scope  # noqa: E402
from operations.files import atomic_write, file_sha256  # noqa: E402
from operations.cli import ArgumentParser, InvalidInput, MissingInput, check_writable, number, run_main  # noqa: E402
from evaluations import fd_dinov2 as dinov2  # noqa: E402
from evaluations.inception import (NUM_CLASSES, POOL_DIM, RANDOM_WEIGHTS, SPATIAL_DIM,  # noqa: E402
                                   inception_weights_id, load_inception)

IMAGES_KEY = "arr_0"
STATS_KEYS = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,),
              "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
IS_SPLIT_SIZE = 5000         # ADM: consecutive chunks of 5000 samples
PR_BATCH_SIZE = 10000        # ADM ManifoldEstimator row_batch_size = col_batch_size
PR_NEIGHBOURHOOD = 3         # ADM nhood_sizes=(3,)
FID_EPS = 1e-6
CACHE_VERSION = 1            # bump when the cached activations would change
RANDOM_WEIGHTS_WARNING = ("WARNING: random Inception weights (--inception-weights random): every number below is "
                          "meaningless; use the real weights for any result you report.")


class NpzArrayReader:
    """One array of an .npz, read `batch_size` rows at a time without loading the rest (like ADM's reader). Other
    layouts than C-order .npy 1.0/2.0 are loaded whole, as ADM does: on the first iter_batches where the header
    gives shape and dtype, so that they are checked before any row is read."""

    def __init__(self, path: str, key: str = IMAGES_KEY):
        if not os.path.isfile(path):
            raise MissingInput(f"{path}: file not found")
        self.path, self.key = path, key
        self._member = key + ".npy"
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise InvalidInput(f"{path}: not an .npz file (not a zip archive)") from None
        with archive:
            names = archive.namelist()
            if self._member not in names:
                keys = ", ".join(n[:-4] for n in names if n.endswith(".npy")) or "none"
                raise InvalidInput(f"{path}: missing {key} in npz file (keys: {keys})")
            try:
                with archive.open(self._member) as f:
                    header = self._read_header(f)
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a small member is read whole here
                raise InvalidInput(f"{path}: {key} is damaged ({e}); write the file again") from None
        if header is None:
            header = self._whole.shape, self._whole.dtype, False
        self.shape, self.dtype, self._streamable = header

    @functools.cached_property
    def _whole(self) -> np.ndarray:
        try:
            with np.load(self.path) as data:
                return data[self.key]
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as e:
            raise InvalidInput(f"{self.path}: {self.key} is damaged ({e}); write the file again") from None

    @staticmethod
    def _read_header(f):
        """(shape, dtype, streamable) of a .npy 1.0/2.0 member, leaving f at the data; None for other formats."""
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        return shape, dtype, not (fortran_order or dtype.hasobject)

    def __len__(self) -> int:
        return self.shape[0]

    def iter_batches(self, batch_size: int) -> Iterator[Tuple[int, np.ndarray]]:
        """Yields (first row index, rows) with up to batch_size rows each."""
        if not self._streamable:
            for start in range(0, len(self), batch_size):
                yield start, self._whole[start:start + batch_size]
            return
        row_shape = self.shape[1:]
        row_bytes = self.dtype.itemsize * int(np.prod(row_shape))
        with zipfile.ZipFile(self.path) as archive, archive.open(self._member) as f:
            self._read_header(f)
            for start in range(0, len(self), batch_size):
                rows = min(batch_size, len(self) - start)
                try:
                    buffer = bytearray(f.read(rows * row_bytes))  # all unless the member ends first; writable
                except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # zip checks the CRC at the end
                    raise InvalidInput(f"{self.path}: {self.key} is damaged ({e}), found while reading rows "
                                       f"{start}..{start + rows - 1}; write the file again") from None
                if len(buffer) < rows * row_bytes:
                    raise InvalidInput(f"{self.path}: {self.key} is truncated (ends inside row {start + rows - 1})")
                yield start, np.frombuffer(buffer, dtype=self.dtype).reshape((rows,) + row_shape)


def open_images(path: str) -> NpzArrayReader:
    """The `arr_0` images of an .npz, checked from the header to be a non-empty uint8 (N, H, W, 3) array."""
    reader = NpzArrayReader(path, IMAGES_KEY)
    shape = reader.shape
    if len(shape) != 4 or shape[-1] != 3 or min(shape) == 0:
        raise InvalidInput(f"{path}: {IMAGES_KEY} must be non-empty RGB images (N, H, W, 3) in NHWC order, got shape "
                           f"{shape}")
    # Only uint8 has one meaning: a float array may be in [0, 1] or [0, 255], and guessing gave FID 6174.
    if reader.dtype != np.uint8:
        raise InvalidInput(f"{path}: {IMAGES_KEY} has dtype {reader.dtype}; the evaluator reads uint8 images in "
                           f"[0, 255], as ADM's reference batches and sample_ddp.py hold them. Convert images in "
                           "[0, 1] with np.clip(np.round(x * 255), 0, 255).astype(np.uint8) (in [0, 255]: "
                           "np.clip(np.round(x), 0, 255).astype(np.uint8)), or write the .npz with sample_ddp.py")
    return reader


def read_statistics(path: str) -> Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """{'pool': (mu, sigma), 'spatial': (mu_s, sigma_s)} from an .npz that holds `mu` (ADM), else None."""
    try:
        with np.load(path) as data:
            if "mu" not in data.files:
                return None
            stats = {}
            for key, shape in STATS_KEYS.items():
                if key not in data.files:
                    raise InvalidInput(f"{path}: holds mu but not {key}; ADM reference statistics are mu, sigma, "
                                       "mu_s, sigma_s")
                stats[key] = data[key]
                if stats[key].shape != shape:
                    raise InvalidInput(f"{path}: {key} has shape {stats[key].shape}, expected {shape}")
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise InvalidInput(f"{path}: damaged .npz ({e}); write the file again") from None
    stats = {"pool": (stats["mu"], stats["sigma"]), "spatial": (stats["mu_s"], stats["sigma_s"])}
    check_finite_statistics(stats, f"{path}: its stored statistics")
    return stats


def check_finite_statistics(stats: Dict[str, Tuple[np.ndarray, np.ndarray]], what: str) -> None:
    """Refuse statistics holding a NaN or an infinity, naming where they came from: scipy's sqrtm of such a matrix
    does not return (the FID would hang, not fail)."""
    for name, keys in (("pool", ("mu", "sigma")), ("spatial", ("mu_s", "sigma_s"))):
        for key, array in zip(keys, stats[name]):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            if bad:
                raise InvalidInput(f"{what}: {key} holds {bad:,} NaN or infinite value(s); no FID can be computed "
                                   "from it")


def _prefetch(iterator: Iterator) -> Iterator:
    """`iterator`'s items, each next one read in a background thread while the network works on this one (its
    errors are raised here)."""
    done = object()
    with ThreadPoolExecutor(max_workers=1) as reader:
        upcoming = reader.submit(next, iterator, done)
        while (item := upcoming.result()) is not done:
            upcoming = reader.submit(next, iterator, done)
            yield item


@torch.inference_mode()
def inception_features(model, images, device: torch.device, with_probs: bool) -> Dict[str, np.ndarray]:
    """Inception outputs of uint8 images (N, H, W, 3), numpy or torch, as float32 numpy {'pool', 'spatial'} and, with
    `with_probs`, 'probs': the softmax of the unbiased logits. TF32 off: the TF graph's numbers are float32's."""
    images = torch.as_tensor(np.ascontiguousarray(images))
    with fp32_precision_scope("ieee"):
        feats = model(images.to(device).permute(0, 3, 1, 2))  # NHWC -> NCHW
        out = {"pool": feats.pool.cpu().numpy(), "spatial": feats.spatial.cpu().numpy()}
        if with_probs:
            out["probs"] = torch.softmax(feats.logits, dim=1).cpu().numpy()
    return out


def compute_activations(model, reader: NpzArrayReader, batch_size: int, device: torch.device,
                        with_probs: bool, desc: str, progress: bool = True) -> Dict[str, np.ndarray]:
    """inception_features of every image of `reader`, in file order, batch_size images at a time."""
    n = len(reader)
    out = {"pool": np.empty((n, POOL_DIM), np.float32), "spatial": np.empty((n, SPATIAL_DIM), np.float32)}
    if with_probs:
        out["probs"] = np.empty((n, NUM_CLASSES), np.float32)
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:  # closed before an error
        for start, images in _prefetch(reader.iter_batches(batch_size)):
            for name, values in inception_features(model, images, device, with_probs).items():
                out[name][start:start + len(images)] = values
            bar.update(len(images))
    return out


def compute_statistics(activations: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(N, D) float32 -> (mu (D,) float32, sigma (D, D) float64), exactly as ADM (np.mean, unbiased np.cov)."""
    return np.mean(activations, axis=0), np.cov(activations, rowvar=False)


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "erw", "evaluator")


def cached_arrays(cache_dir: Optional[str], key: Optional[str], shapes: Dict[str, tuple],
                  compute: Callable[[], Dict[str, np.ndarray]], prefix: str = "") -> Tuple[Dict[str, np.ndarray], str]:
    """compute()'s arrays, or those an earlier call with this key left in cache_dir if they have `shapes` (else they
    are computed again), and "hit" | "miss" | "off" (cache_dir None: no cache)."""
    if cache_dir is None:
        return compute(), "off"
    path = os.path.join(cache_dir, prefix + hashlib.sha256(key.encode()).hexdigest()[:32] + ".npz")
    try:
        with np.load(path) as cached:
            arrays = {name: cached[name] for name in shapes}
        if all(arrays[name].shape == shape for name, shape in shapes.items()):
            return arrays, "hit"
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, zlib.error, EOFError):
        pass
    arrays = compute()
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return arrays, "miss"


def reference_activations(model, ref_batch: str, reader: NpzArrayReader, net_id: str, device: torch.device,
                          batch_size: int, cache_dir: Optional[str], progress: bool = True
                          ) -> Tuple[Dict[str, np.ndarray], str]:
    """Pool and spatial activations of the reference batch and the cache state (cached_arrays), keyed by the file's
    sha256, the Inception weights and the device type."""
    key = None if cache_dir is None else f"{CACHE_VERSION}|{file_sha256(ref_batch)}|{net_id}|{device.type}"
    return cached_arrays(cache_dir, key, {"pool": (len(reader), POOL_DIM), "spatial": (len(reader), SPATIAL_DIM)},
                         lambda: compute_activations(model, reader, batch_size, device, with_probs=False,
                                                     desc="reference batch", progress=progress))


def fd_dinov2_reference(fd: dinov2.FdDinov2, ref_batch: str, reader: NpzArrayReader, batch_size: int,
                        cache_dir: Optional[str], progress: bool = True) -> Tuple[tuple, Dict[str, object]]:
    """FD-DINOv2's (mu, sigma) of the reference batch, cached keyed by the file's sha256, the weights' sha256 and the
    device type, and the record of what they were computed from, with the cache state (cached_arrays)."""
    source = {"ref_batch": os.path.abspath(ref_batch), "ref_sha256": file_sha256(ref_batch),
              "num_images": len(reader), "dinov2_weights": os.path.abspath(fd.path),
              "dinov2_weights_sha256": fd.weights_sha256, "preprocessing": dinov2.PREPROCESSING,
              "device": fd.device.type, "version": dinov2.CACHE_VERSION}
    key = json.dumps({k: source[k] for k in ("ref_sha256", "dinov2_weights_sha256", "device", "version")})

    def compute():
        mu, sigma = fd.statistics_of(reader, batch_size, "reference batch (DINOv2)", progress)
        return {"mu": mu, "sigma": sigma, "source": np.array(json.dumps(source))}
    width = fd.model.embed_dim
    arrays, cache = cached_arrays(cache_dir, key, {"mu": (width,), "sigma": (width, width), "source": ()}, compute,
                                  prefix="fd-dinov2-")
    reference = arrays["mu"], arrays["sigma"]
    dinov2.check_finite(reference, ref_batch)
    return reference, {**json.loads(str(arrays["source"])), "cache": cache}


def inception_score(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's IS: probs (N, C) float32 softmax outputs, consecutive splits of `split_size` (the last one may be
    smaller), no shuffling; exp(mean KL(p(y|x) || p(y))) per split, mean over splits."""
    if len(probs) < split_size:
        raise InvalidInput(f"Inception Score needs at least one split of {split_size} samples, got {len(probs)} "
                           f"(lower the split size, e.g. --is-split-size, for small sample sets)")
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.where(part > 0, kl, 0)  # the limit 0 * log 0 = 0
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    # Without `disp`, scipy returns only the root on every version (disp is deprecated in 1.16, removed in 1.18).
    return scipy.linalg.sqrtm(matrix)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = FID_EPS) -> float:
    """ADM/TTUR Frechet distance between N(mu1, sigma1) (samples) and N(mu2, sigma2) (reference)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape}, {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances have different dimensions: {sigma1.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's DistanceBlock: (n, D), (m, D) float32 -> (n, m) float32 squared distances max(|u|^2 - 2 u.v + |v|^2, 0)
    evaluated in fp16 the way TF's GPU kernels do (fp16 squares, fp32-accumulated sums and matmul rounded to fp16,
    fp16 add/sub), or in fp32 if any fp16 result is not finite."""
    u16, v16 = u.half(), v.half()
    norm_u = (u16 * u16).float().sum(1, keepdim=True).half()
    norm_v = (v16 * v16).float().sum(1, keepdim=True).half()
    dots = (u16.float() @ v16.float().t()).half()
    dist = torch.clamp_min((norm_u - 2 * dots) + norm_v.t(), 0)
    if torch.isfinite(dist).all():
        return dist.float()
    norm_u, norm_v = (u * u).sum(1, keepdim=True), (v * v).sum(1, keepdim=True)
    return torch.clamp_min((norm_u - 2 * (u @ v.t())) + norm_v.t(), 0)


def manifold_radii(features: torch.Tensor, k: int, batch_size: int, bar: tqdm) -> torch.Tensor:
    """(N, D) -> (N,) squared distance of each point to its k-th nearest neighbour (the point itself is 0th)."""
    n = len(features)
    radii = torch.empty(n, device=features.device)
    for row in range(0, n, batch_size):
        rows = features[row:row + batch_size]
        block = torch.empty(len(rows), n, device=features.device)
        for col in range(0, n, batch_size):
            block[:, col:col + batch_size] = squared_distances(rows, features[col:col + batch_size])
            bar.update(1)
        radii[row:row + len(rows)] = block.kthvalue(k + 1, dim=1).values
    return radii


def precision_recall(ref_features: torch.Tensor, sample_features: torch.Tensor, k: int = PR_NEIGHBOURHOOD,
                     batch_size: int = PR_BATCH_SIZE, progress: bool = False) -> Tuple[float, float]:
    """ADM's improved precision/recall (Kynkaanniemi et al.) on (N_ref, D) and (N_sample, D) float32 features: the
    fraction of samples within some reference point's k-NN ball (d^2 <= radius^2), and the converse."""
    for name, feats in (("reference", ref_features), ("sample", sample_features)):
        if len(feats) < k + 1:
            raise InvalidInput(f"precision/recall with k={k} needs at least {k + 1} {name} images, got {len(feats)}")
    n_ref, n_sample = len(ref_features), len(sample_features)
    ref_blocks, sample_blocks = -(-n_ref // batch_size), -(-n_sample // batch_size)
    bar = tqdm(total=ref_blocks ** 2 + sample_blocks ** 2 + ref_blocks * sample_blocks,
               desc="precision/recall", unit="block", disable=not progress, file=sys.stderr)
    ref_in = torch.zeros(n_ref, dtype=torch.bool, device=ref_features.device)
    sample_in = torch.zeros(n_sample, dtype=torch.bool, device=ref_features.device)
    with fp32_precision_scope("ieee"):  # the fp32 matmul inside squared_distances must not run in TF32
        ref_radii = manifold_radii(ref_features, k, batch_size, bar)
        sample_radii = manifold_radii(sample_features, k, batch_size, bar)
        for row in range(0, n_ref, batch_size):
            for col in range(0, n_sample, batch_size):
                dist = squared_distances(ref_features[row:row + batch_size],
                                         sample_features[col:col + batch_size])
                ref_in[row:row + batch_size] |= (dist <= sample_radii[None, col:col + batch_size]).any(dim=1)
                sample_in[col:col + batch_size] |= (dist <= ref_radii[row:row + batch_size, None]).any(dim=0)
                bar.update(1)
    bar.close()
    # count / N in float64, which is what np.mean over ADM's boolean arrays gives
    return int(sample_in.sum()) / n_sample, int(ref_in.sum()) / n_ref


def evaluate(ref_batch: str, sample_batch: str, inception_weights: Optional[str] = None,
             device: Optional[str] = None, batch_size: int = 64, is_split_size: int = IS_SPLIT_SIZE,
             pr_batch_size: int = PR_BATCH_SIZE, cache_dir: Optional[str] = None, use_cache: bool = True,
             progress: bool = True, log: Optional[Callable[[str], None]] = print,
             allow_resolution_mismatch: bool = False, fd_dinov2: bool = False,
             dinov2_weights: Optional[str] = None) -> dict:
    """ADM metrics of `sample_batch` against `ref_batch` (.npz paths), the flags' meanings as arguments:
    {'inception_score', 'fid', 'sfid', 'precision', 'recall', 'settings', 'timings_s'}, and 'fd_dinov2' with
    `fd_dinov2`. `log` gets ADM's progress and result lines (None: silent)."""
    log = log or (lambda line: None)
    if batch_size < 1 or pr_batch_size < 1 or is_split_size < 1:
        raise InvalidInput(f"batch sizes and the IS split size must be positive, got batch_size={batch_size}, "
                           f"pr_batch_size={pr_batch_size}, is_split_size={is_split_size}")
    cache_dir = (cache_dir or default_cache_dir()) if use_cache else None
    if cache_dir is not None:
        check_writable(cache_dir, "--cache-dir", folder=True, hint="pass another --cache-dir, or --no-cache")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(f"--device {device}: CUDA is not available on this machine")
    ref_reader, sample_reader = open_images(ref_batch), open_images(sample_batch)
    (ref_h, ref_w), (sample_h, sample_w) = ref_reader.shape[1:3], sample_reader.shape[1:3]
    mismatch = None
    if (ref_h, ref_w) != (sample_h, sample_w):
        mismatch = (f"{sample_batch} holds {sample_h}x{sample_w} images, the reference batch {ref_batch} "
                    f"{ref_h}x{ref_w} (height x width)")
        if not allow_resolution_mismatch:
            raise InvalidInput(f"{mismatch}: the numbers would compare two resolutions; evaluate samples at the "
                               "reference's resolution, or pass --allow-resolution-mismatch")
    if len(sample_reader) < is_split_size:
        raise InvalidInput(f"{sample_batch}: {len(sample_reader)} samples, fewer than one Inception-Score split of "
                           f"{is_split_size} (ADM uses 50000 samples; lower --is-split-size for small sets)")
    for path, reader in ((ref_batch, ref_reader), (sample_batch, sample_reader)):
        if len(reader) < PR_NEIGHBOURHOOD + 1:
            raise InvalidInput(f"{path}: {len(reader)} images; precision/recall needs at least "
                               f"{PR_NEIGHBOURHOOD + 1}")
    ref_file_stats, sample_file_stats = read_statistics(ref_batch), read_statistics(sample_batch)
    fd = dinov2.FdDinov2(dinov2_weights, device, "--dinov2-weights") if fd_dinov2 else None  # before any work
    marks = [("start", time.perf_counter())]

    def lap(name):  # the seconds since the previous lap: results["timings_s"][name]
        marks.append((name, time.perf_counter()))

    model = load_inception(inception_weights, device)
    net_id = inception_weights_id(inception_weights)
    lap("load_inception")

    log("computing reference batch activations...")
    ref_acts, cache_state = reference_activations(model, ref_batch, ref_reader, net_id, device, batch_size,
                                                  cache_dir, progress)
    lap("reference_activations")

    log("computing/reading reference batch statistics...")
    ref_stats = ref_file_stats or {name: compute_statistics(ref_acts[name]) for name in ("pool", "spatial")}
    check_finite_statistics(ref_stats, f"{ref_batch}: the statistics of its Inception features")
    lap("reference_statistics")

    log("computing sample batch activations...")
    sample_acts = compute_activations(model, sample_reader, batch_size, device, with_probs=True,
                                      desc="sample batch", progress=progress)
    lap("sample_activations")

    log("computing/reading sample batch statistics...")
    sample_stats = sample_file_stats or {name: compute_statistics(sample_acts[name]) for name in ("pool", "spatial")}
    check_finite_statistics(sample_stats, f"{sample_batch}: the statistics of its Inception features")
    lap("sample_statistics")

    log("Computing evaluations...")
    results = {"inception_score": inception_score(sample_acts["probs"], is_split_size)}
    lap("inception_score")
    results["fid"] = frechet_distance(*sample_stats["pool"], *ref_stats["pool"])
    results["sfid"] = frechet_distance(*sample_stats["spatial"], *ref_stats["spatial"])
    lap("fid_sfid")
    results["precision"], results["recall"] = precision_recall(
        torch.from_numpy(ref_acts["pool"]).to(device), torch.from_numpy(sample_acts["pool"]).to(device),
        PR_NEIGHBOURHOOD, pr_batch_size, progress)
    lap("precision_recall")
    if fd is not None:
        fd_reference, fd_source = fd_dinov2_reference(fd, ref_batch, ref_reader, batch_size, cache_dir, progress)
        fd_samples = fd.statistics_of(sample_reader, batch_size, "sample batch (DINOv2)", progress)
        dinov2.check_finite(fd_samples, "the sample batch")
        results["fd_dinov2"] = dinov2.frechet_distance(*fd_samples, *fd_reference)
        lap("fd_dinov2")
    if inception_weights == RANDOM_WEIGHTS:  # once, next to the numbers it is about
        log(RANDOM_WEIGHTS_WARNING)
    if mismatch:
        log(f"WARNING: {mismatch}, evaluated as asked (--allow-resolution-mismatch)")
    lines = [f"Inception Score: {results['inception_score']}", f"FID: {results['fid']}", f"sFID: {results['sfid']}",
             f"Precision: {results['precision']}", f"Recall: {results['recall']}"]  # ADM's print("Label:", value)
    for line in lines + ([f"FD_DINOv2: {results['fd_dinov2']}"] if fd is not None else []):
        log(line)

    results["settings"] = {
        "ref_batch": os.path.abspath(ref_batch), "sample_batch": os.path.abspath(sample_batch),
        "num_ref": len(ref_reader), "num_samples": len(sample_reader),
        "ref_statistics": "from ref_batch mu/sigma/mu_s/sigma_s" if ref_file_stats else "computed from arr_0",
        "sample_statistics": "from sample_batch mu/sigma/mu_s/sigma_s" if sample_file_stats else "computed from arr_0",
        "inception_weights": inception_weights or "torch hub cache", "inception_id": net_id,
        "device": str(device), "batch_size": batch_size, "is_split_size": is_split_size,
        "pr_batch_size": pr_batch_size, "pr_k": PR_NEIGHBOURHOOD, "activation_cache": cache_state,
        "image_sizes": {"ref": [ref_h, ref_w], "samples": [sample_h, sample_w]},
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__},
    }
    if fd is not None:
        results["settings"]["fd_dinov2"] = {"reference_statistics": fd_source, "preprocessing": dinov2.PREPROCESSING}
    if inception_weights == RANDOM_WEIGHTS:
        results["warning"] = RANDOM_WEIGHTS_WARNING
    results["timings_s"] = {name: round(t - before, 3) for (_, before), (name, t) in zip(marks, marks[1:])}
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("ref_batch", help="reference .npz (arr_0 images; optional mu/sigma/mu_s/sigma_s)")
    parser.add_argument("sample_batch", help="sample .npz (arr_0 images, e.g. from sample_ddp.py)")
    parser.add_argument("--json", default=None,
                        help="also write the metrics and resolved settings to this file (default: none)")
    parser.add_argument("--inception-weights", default=None,
                        help="pt_inception-2015-12-05-6726825d.pth path (default: the torch hub cache), or "
                             "'random' for meaningless numbers (tests, demos)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batch-size", type=number("[1, inf)"), default=64,
                        help="images per Inception batch (ADM: 64)")
    parser.add_argument("--is-split-size", type=number("[1, inf)"), default=IS_SPLIT_SIZE,
                        help="samples per Inception-Score split (ADM: 5000)")
    parser.add_argument("--pr-batch-size", type=number("[1, inf)"), default=PR_BATCH_SIZE,
                        help="rows/columns per precision/recall distance block (ADM: 10000)")
    parser.add_argument("--cache-dir", default=None,
                        help=f"where reference activations are cached (default: {default_cache_dir()})")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the activation cache")
    parser.add_argument("--allow-resolution-mismatch", action="store_true",
                        help="evaluate samples of another size than the reference batch's (refused otherwise)")
    parser.add_argument("--fd-dinov2", action="store_true",
                        help="also FD-DINOv2, as edm2's calculate_metrics.py computes it (evaluations/fd_dinov2.py)")
    parser.add_argument("--dinov2-weights", default=None,
                        help="DINOv2 ViT-L/14 weights of --fd-dinov2: dinov2_vitl14_pretrain.pth or timm's "
                             "model.safetensors (default: the torch hub or Hugging Face cache)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.json:
        check_writable(args.json, "--json")
    results = evaluate(args.ref_batch, args.sample_batch, inception_weights=args.inception_weights,
                       device=args.device, batch_size=args.batch_size, is_split_size=args.is_split_size,
                       pr_batch_size=args.pr_batch_size, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                       allow_resolution_mismatch=args.allow_resolution_mismatch,
                       fd_dinov2=args.fd_dinov2, dinov2_weights=args.dinov2_weights)
    if args.json:
        atomic_write(args.json, lambda f: f.write((json.dumps(results, indent=2) + "\n").encode()))


if __name__ == "__main__":
    run_main(main)
