"""ADM evaluator speed: Inception feature extraction (images/s, through the .npz streaming pipeline and the bare
network), precision/recall (seconds) at N samples, one FID (scipy sqrtm, 2048 dims) and optionally the whole
evaluate() on synthetic .npz files. Random Inception weights: the timings are those of the real network.

    python -m bench.bench_evaluator --n-images 8 --pr-samples 2000 --pr-ref 1000                       # CPU
    python -m bench.bench_evaluator --n-images 4096 --pr-samples 50000 --pr-ref 10000 \\
        --end-to-end 50000 10000 --workdir /tmp/bench-evaluator                                          # one GPU

Prints one JSON object.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
import zipfile

if not __package__:  # started as a path: the repository root, where erw/ lives, is not importable
    sys.exit("error: run from the repository root as `python -m bench.bench_evaluator ...`")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evaluations.evaluator import (IS_SPLIT_SIZE, PR_BATCH_SIZE, compute_activations, compute_statistics, evaluate,  # noqa: E402
                                   exact_fp32, frechet_distance, open_images, precision_recall)
from evaluations.inception import POOL_DIM, load_inception  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_synthetic_npz(path: str, n: int, size: int, seed: int, chunk: int = 1024) -> None:
    """An uncompressed .npz with arr_0 = (n, size, size, 3) uint8, written in chunks (never all in memory): a pool of
    random images repeated in a seed-dependent order."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, (min(chunk, n), size, size, 3), dtype=np.uint8)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (n, size, size, 3)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for start in range(0, n, chunk):
                rows = min(chunk, n - start)
                f.write(pool[rng.permutation(len(pool))[:rows]].tobytes())


def bench_features(model, n_images, image_size, batch_size, device, workdir):
    path = os.path.join(workdir, "features.npz")
    write_synthetic_npz(path, n_images, image_size, seed=0)
    reader = open_images(path)
    compute_activations(model, reader, batch_size, device, with_probs=True, desc="warmup", progress=False)
    _sync(device)
    start = time.perf_counter()
    compute_activations(model, reader, batch_size, device, with_probs=True, desc="features", progress=False)
    _sync(device)
    pipeline_s = time.perf_counter() - start
    images = torch.from_numpy(next(reader.iter_batches(batch_size))[1]).to(device).permute(0, 3, 1, 2)
    batches = max(1, n_images // batch_size)
    with exact_fp32(), torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            model(images)
        _sync(device)
        network_s = time.perf_counter() - start
    os.remove(path)
    return {"n_images": n_images, "image_size": image_size, "batch_size": batch_size,
            "pipeline_images_per_s": round(n_images / pipeline_s, 1),
            "network_only_images_per_s": round(batches * len(images) / network_s, 1)}


def bench_precision_recall(n_ref, n_samples, device, batch_size):
    g = torch.Generator().manual_seed(0)
    # non-negative, pool_3-like magnitudes
    ref = torch.randn(n_ref, POOL_DIM, generator=g).abs().to(device)
    samples = (torch.randn(n_samples, POOL_DIM, generator=g).abs() * 1.05).to(device)
    _sync(device)
    start = time.perf_counter()
    precision, recall = precision_recall(ref, samples, batch_size=batch_size)
    _sync(device)
    return {"n_ref": n_ref, "n_samples": n_samples, "batch_size": batch_size,
            "seconds": round(time.perf_counter() - start, 3), "precision": precision, "recall": recall}


def bench_fid(n_rows):
    rng = np.random.default_rng(0)
    acts1 = np.abs(rng.standard_normal((n_rows, POOL_DIM), dtype=np.float32))
    acts2 = np.abs(rng.standard_normal((n_rows, POOL_DIM), dtype=np.float32)) * 1.1
    start = time.perf_counter()
    stats1, stats2 = compute_statistics(acts1), compute_statistics(acts2)
    stats_s = time.perf_counter() - start
    start = time.perf_counter()
    fid = frechet_distance(*stats1, *stats2)
    return {"n_rows": n_rows, "dim": POOL_DIM, "statistics_s_both": round(stats_s, 3),
            "frechet_distance_s": round(time.perf_counter() - start, 3), "fid": fid}


def bench_end_to_end(n_samples, n_ref, image_size, batch_size, device, workdir, is_split_size=IS_SPLIT_SIZE):
    ref_path, sample_path = os.path.join(workdir, "ref.npz"), os.path.join(workdir, "samples.npz")
    start = time.perf_counter()
    write_synthetic_npz(ref_path, n_ref, image_size, seed=1)
    write_synthetic_npz(sample_path, n_samples, image_size, seed=2)
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    results = evaluate(ref_path, sample_path, inception_weights="random", device=str(device),
                       batch_size=batch_size, is_split_size=is_split_size, use_cache=False, progress=False, log=None)
    total_s = time.perf_counter() - start
    os.remove(ref_path)
    os.remove(sample_path)
    return {"n_samples": n_samples, "n_ref": n_ref, "image_size": image_size, "batch_size": batch_size,
            "write_npz_s": round(write_s, 1), "evaluate_s": round(total_s, 1), "stages_s": results["timings_s"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n-images", type=int, default=8, help="images for the feature-extraction timing")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="Inception batch size (ADM: 64)")
    parser.add_argument("--pr-samples", type=int, default=2000)
    parser.add_argument("--pr-ref", type=int, default=1000)
    parser.add_argument("--pr-batch-size", type=int, default=PR_BATCH_SIZE)
    parser.add_argument("--fid-rows", type=int, default=4000,
                        help="activations per set for the statistics + FID timing (0: skip)")
    parser.add_argument("--end-to-end", type=int, nargs=2, metavar=("N_SAMPLES", "N_REF"), default=None,
                        help="also time evaluate() on synthetic .npz files of this many images")
    parser.add_argument("--workdir", default=None, help="where the synthetic .npz files go (default: a temp dir)")
    args = parser.parse_args()
    device = torch.device(args.device)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-evaluator-")
    os.makedirs(workdir, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or "cpu", "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    model = load_inception("random", device)
    report["features"] = bench_features(model, args.n_images, args.image_size, args.batch_size, device, workdir)
    report["precision_recall"] = bench_precision_recall(args.pr_ref, args.pr_samples, device, args.pr_batch_size)
    if args.fid_rows:
        report["fid"] = bench_fid(args.fid_rows)
    if args.end_to_end:
        report["end_to_end"] = bench_end_to_end(*args.end_to_end, args.image_size, args.batch_size, device,
                                                workdir)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
