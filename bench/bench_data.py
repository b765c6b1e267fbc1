"""Data benchmark: training-dataloader samples/s on the demo data, and `encode` images/s. Prints one JSON object.

    python -m bench.bench_data                                   # CPU-sized defaults, tiny VAE
    python -m bench.bench_data --encode-vae sd-arch --encode-resolution 256 --encode-images 4096   # on a GPU

`--encode-vae sd-arch` encodes with a randomly initialised VAE of SD-VAE's exact architecture (sd-vae-ft-mse's
config), which costs what the real one costs, so the throughput is measured without downloading weights.
"""
import os
import sys

if not __package__:  # started as a path: the repository root, where erw/ lives, is not importable
    sys.exit("error: run from the repository root as `python -m bench.bench_data ...`")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from erw.data import ImageLatentDataset, sample_latents  # noqa: E402
from models.vae import SD_VAE_CONFIG  # noqa: E402
from preprocessing import dataset_tools  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167


def bench_dataloader(data_dir: str, batch_size: int, workers: int, batches: int, device: torch.device) -> dict:
    """Shuffled epochs of ImageLatentDataset through a DataLoader, to the device, latents sampled: samples/s."""
    dataset = ImageLatentDataset(data_dir)
    warmup_batches = 2 * max(workers, 1)  # starts the workers and warms the page cache
    # One long shuffled stream over repeated epochs, as the training loop's sampler gives: the small demo set
    # would otherwise end an epoch every few batches and leave most workers idle at each restart.
    sampler = RandomSampler(dataset, num_samples=(warmup_batches + batches) * batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                        pin_memory=device.type == "cuda")
    stream = iter(loader)

    def run(num_batches):
        for _ in range(num_batches):
            images, moments, labels = next(stream)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            sample_latents(moments.to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(warmup_batches)
    start = time.perf_counter()
    run(batches)
    seconds = time.perf_counter() - start
    return {"samples_per_s": round(batches * batch_size / seconds, 1), "batch_size": batch_size,
            "num_workers": workers, "batches": batches, "resolution": dataset.resolution,
            "dataset_size": len(dataset), "device": device.type}


def _write_demo_png(task):
    index, label, resolution, images_dir = task
    dataset_tools.save_png_atomic(dataset_tools.demo_image(label, index, 0, resolution),
                                  os.path.join(images_dir, dataset_tools.image_relpath(index)), compress_level=0)


def bench_encode(work_dir: str, vae: str, resolution: int, num_images: int, batch_size: int, workers: int) -> dict:
    """Time `dataset_tools.run_encode` (PNG loading + VAE + atomic .npy writes) on generated PNGs."""
    images_dir = os.path.join(work_dir, "encode-images")
    tasks = [(index, index % len(dataset_tools.DEMO_SHAPES), resolution, images_dir) for index in range(num_images)]
    with multiprocessing.get_context("fork").Pool(max(workers, 1)) as pool:
        pool.map(_write_demo_png, tasks, chunksize=16)
    labels = [(dataset_tools.image_relpath(index), label) for index, label, _, _ in tasks]
    dataset_tools.write_image_labels(images_dir, labels, dataset_tools.DEMO_SHAPES)
    if vae == "sd-arch":
        from diffusers.models import AutoencoderKL
        vae_dir = os.path.join(work_dir, "sd-arch-vae")
        AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(vae_dir)
        vae_name = vae_dir
    else:
        vae_name = vae
    # One untimed pass over a few images loads the VAE code paths and (on GPU) the CUDA context and kernels.
    dataset_tools.run_encode(images_dir, os.path.join(work_dir, "warmup"), vae_name, batch_size, workers,
                             max_images=min(num_images, 2 * batch_size))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    dataset_tools.run_encode(images_dir, os.path.join(work_dir, "vae-sd"), vae_name, batch_size, workers)
    seconds = time.perf_counter() - start
    per_second = num_images / seconds
    return {"images_per_s": round(per_second, 1), "seconds": round(seconds, 2), "images": num_images,
            "resolution": resolution, "batch_size": batch_size, "num_workers": workers, "vae": vae,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "imagenet_minutes_at_this_rate_on_8_processes": round(IMAGENET_TRAIN_IMAGES / (8 * per_second) / 60, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="data folder for the loader benchmark (default: a fresh demo)")
    parser.add_argument("--resolution", type=int, default=64, help="demo image side when --data is not given")
    parser.add_argument("--batch-size", type=int, default=64, help="loader batch size")
    parser.add_argument("--workers", type=int, default=2, help="loader / encode worker processes")
    parser.add_argument("--batches", type=int, default=50, help="timed loader batches")
    parser.add_argument("--encode-vae", default="random-tiny", help="random-tiny, sd-arch, or a diffusers folder")
    parser.add_argument("--encode-resolution", type=int, default=64)
    parser.add_argument("--encode-images", type=int, default=256)
    parser.add_argument("--encode-batch-size", type=int, default=64)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as work_dir:
        data_dir = args.data
        if data_dir is None:
            data_dir = os.path.join(work_dir, "demo")
            dataset_tools.main(["make-demo", "--dest", data_dir, "--resolution", str(args.resolution)])
        result = {
            "dataloader": bench_dataloader(data_dir, args.batch_size, args.workers, args.batches, device),
            "encode": bench_encode(work_dir, args.encode_vae, args.encode_resolution, args.encode_images,
                                   args.encode_batch_size, args.workers),
            "torch_threads": torch.get_num_threads(),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
