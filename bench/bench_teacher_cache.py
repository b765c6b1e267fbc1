"""The teacher-token cache and packed latents, measured; prints one JSON object.

    python -m bench.bench_teacher_cache                                     # the 2-core CPU: SiT-B/2, k=4, batch 8
    python -m bench.bench_teacher_cache --model SiT-XL/2 --warmup-depth 5 --batch-size 32 --device cuda

phase1: a Phase-1 step (the truncated SiT, NT-Xent, backward, AdamW) fed by the live teacher (DINOv2-B's
architecture, random weights: timing only; the images decoded beforehand) and by cached tokens (float16 rows read from
a cache's memory-mapped shard, as the dataset returns them, moved to the device and converted), alternated in one
process; medians over --steps of each, and their ratio.

loader: items/s of ONE DataLoader worker at ImageNet-256's item sizes (moments 8 x 32 x 32 float32, 32 KiB; tokens
256 x 768 float16, 384 KiB) from the per-file layout (a .npy per item, no image decoded), from packed latents, and
from packed latents plus cached tokens. The files were just written, so they are in the page cache: these are the
CPU cost of reading, an upper bound for what a network file system delivers.

cluster: images/s one GPU consumes at the step times of README's benchmark table (H100, batch 32), against one
worker's items/s: the workers per GPU each layout needs.
"""
import os
import sys

if not __package__:  # started as a path: the repository root, where erw/ lives, is not importable
    sys.exit("error: run from the repository root as `python -m bench.bench_teacher_cache ...`")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from bench.bench_phases import timed  # noqa: E402
from erw.data import ImageLatentDataset  # noqa: E402
from erw.losses import Objective  # noqa: E402
from erw.teacher_cache import TeacherCache, run_identity, write_identity, write_shard  # noqa: E402
from models.encoders import Teacher, build_teacher, preprocessing_text  # noqa: E402
from models.sit import create_sit  # noqa: E402
from preprocessing import dataset_tools  # noqa: E402

# README's benchmark table (H100, bf16, per-GPU batch 32, teacher excluded): seconds per step.
GPU_STEP_S = {"SiT-XL/2 Phase 2": 0.124, "SiT-XL/2 Phase 1 (k=4)": 0.17 * 0.124,
              "SiT-B/2 Phase 2": 0.038, "SiT-B/2 Phase 1 (k=4)": 0.38 * 0.038}
GPU_BATCH = 32


def synthetic_cache(folder: str, count: int, tokens: int, width: int) -> TeacherCache:
    identity = run_identity(["random-dinov2-vit-b"], ["random:random-dinov2-vit-b"], 256,
                            preprocessing_text(["random-dinov2-vit-b"]), [f"{i:08d}.png" for i in range(count)],
                            widths=[width], tokens=tokens)
    write_identity(folder, identity)
    rng = np.random.default_rng(0)
    for shard in range(math.ceil(count / identity.shard_items)):
        rows = min(identity.shard_items, count - shard * identity.shard_items)
        write_shard(folder, shard, rng.standard_normal((rows, tokens, width), dtype=np.float32).astype(np.float16))
    return TeacherCache(folder)


def bench_phase1(model_name: str, warmup_depth: int, batch_size: int, resolution: int, steps: int, warmup: int,
                 device: torch.device, teacher: Teacher) -> dict:
    """A Phase-1 step fed by `teacher` live and by cached tokens of its shape, alternated: medians and their ratio."""
    torch.manual_seed(0)
    n, latent = batch_size, resolution // 8
    teacher = teacher.to(device)
    images = torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8, device=device)
    model = create_sit(model_name, input_size=latent, z_dims=[teacher.embed_dim], encoder_depth=warmup_depth,
                       built_depth=warmup_depth).to(device)
    objective = Objective(velocity=False, align="ntxent")
    latents, labels = torch.randn(n, 4, latent, latent, device=device), torch.randint(0, 1000, (n,), device=device)
    with tempfile.TemporaryDirectory() as folder:
        cache = synthetic_cache(folder, 4 * n, teacher.num_tokens, teacher.embed_dim)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)

        def step(tokens):
            with autocast:
                loss, _ = objective(model, latents, labels, tokens, 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        def live():
            with autocast:
                tokens = teacher(images).float()
            step([tokens])

        def cached():  # the rows a DataLoader worker would read for the batch, then to the device
            rows = torch.from_numpy(np.stack([cache.tokens(i) for i in range(n)]))
            step([rows.to(device, non_blocking=True).float()])

        times = {"live": [], "cached": []}
        for i in range(warmup + steps):
            for name, fn in (("live", live), ("cached", cached)):
                seconds = timed(fn, device)
                if i >= warmup:
                    times[name].append(seconds)
    live_s, cached_s = statistics.median(times["live"]), statistics.median(times["cached"])
    return {"model": model_name, "warmup_depth": warmup_depth, "batch_size": n, "device": device.type,
            "teacher": teacher.name, "live_teacher_step_s": round(live_s, 4),
            "cached_tokens_step_s": round(cached_s, 4), "cached_over_live": round(cached_s / live_s, 3),
            "steps": steps}


def write_layouts(folder: str, count: int) -> str:
    """A per-file data folder of `count` items at ImageNet-256's latent size (black 256-px PNGs: only the first is
    ever read), then packed; returns the folder (packed/ beside vae-sd/)."""
    rng = np.random.default_rng(0)
    images, latents = os.path.join(folder, "images"), os.path.join(folder, "vae-sd")
    black = np.zeros((256, 256, 3), dtype=np.uint8)
    labels = []
    for i in range(count):
        rel = dataset_tools.image_relpath(i)
        os.makedirs(os.path.dirname(os.path.join(images, rel)), exist_ok=True)
        PIL.Image.fromarray(black).save(os.path.join(images, rel))
        latent_rel = dataset_tools.latent_relpath(rel)
        os.makedirs(os.path.dirname(os.path.join(latents, latent_rel)), exist_ok=True)
        np.save(os.path.join(latents, latent_rel), rng.standard_normal((8, 32, 32), dtype=np.float32))
        labels.append([latent_rel, i % 1000])
    with open(os.path.join(latents, "dataset.json"), "w") as f:
        json.dump({"labels": labels}, f)
    return folder


def items_per_s(dataset, items: int) -> float:
    loader = DataLoader(dataset, batch_size=32, num_workers=1, drop_last=True,
                        sampler=RandomSampler(dataset, num_samples=items + 64))
    stream = iter(loader)
    for _ in range(2):  # starts the worker
        next(stream)
    start = time.perf_counter()
    for _ in range(items // 32):
        next(stream)
    return round(items // 32 * 32 / (time.perf_counter() - start), 1)


def bench_loader(args) -> dict:
    with tempfile.TemporaryDirectory() as root:
        per_file = write_layouts(os.path.join(root, "per-file"), args.items)
        packed = os.path.join(root, "packed")
        os.rename(per_file, packed)
        os.makedirs(per_file)
        os.symlink(os.path.join(packed, "images"), os.path.join(per_file, "images"))
        os.symlink(os.path.join(packed, "vae-sd"), os.path.join(per_file, "vae-sd"))
        dataset_tools.main(["pack", "--data-dir", packed, "--workers", "0"])
        cache = synthetic_cache(os.path.join(root, "cache"), args.items, 256, 768)
        result = {
            "per_file_items_per_s": items_per_s(ImageLatentDataset(per_file, load_images=False), args.items),
            "packed_items_per_s": items_per_s(ImageLatentDataset(packed, load_images=False), args.items),
            "packed_with_cache_items_per_s": items_per_s(ImageLatentDataset(packed, teacher_cache=cache),
                                                         args.items),
            "items": args.items, "workers": 1,
        }
    return result


def cluster(loader: dict) -> dict:
    needed = {name: round(GPU_BATCH / seconds, 1) for name, seconds in GPU_STEP_S.items()}
    return {"gpu_images_per_s": needed, "source": "README benchmark table, H100, bf16, batch 32, teacher excluded",
            "workers_per_gpu": {layout: {name: math.ceil(rate / loader[layout]) for name, rate in needed.items()}
                                for layout in ("per_file_items_per_s", "packed_items_per_s",
                                               "packed_with_cache_items_per_s")}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SiT-B/2")
    parser.add_argument("--warmup-depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each kind (alternated)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--items", type=int, default=2048, help="items of the loader benchmark's data")
    parser.add_argument("--skip-phase1", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    result = {}
    if not args.skip_phase1:
        teacher = build_teacher("random-dinov2-vit-b", args.resolution)  # DINOv2-B's architecture, random weights
        result["phase1"] = bench_phase1(args.model, args.warmup_depth, args.batch_size, args.resolution, args.steps,
                                        args.warmup, torch.device(args.device), teacher)
    result["loader"] = bench_loader(args)
    result["cluster"] = cluster(result["loader"])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
