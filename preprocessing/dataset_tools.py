"""Prepare training data in REPA/EDM2's format (docs/data.md): ImageNet folder -> PNGs -> SD-VAE latents, then
optionally packed latents and a teacher cache; a reference batch; or an offline demo set.

    python -m preprocessing.dataset_tools convert --source IMAGENET/train --dest DATA/images --resolution 256
    torchrun --nproc_per_node 8 -m preprocessing.dataset_tools encode --source DATA/images --dest DATA/vae-sd
    python -m preprocessing.dataset_tools make-demo --dest data/demo
"""
import os
import sys

if not __package__:  # started as a path: the repository root, where erw/ lives, is not importable
    sys.exit("error: run from the repository root as `python -m preprocessing.dataset_tools ...`")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
from contextlib import contextmanager, nullcontext  # noqa: E402
from typing import List, Optional, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import PIL.ImageDraw  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from erw.data import (IDENTITY_KEY, IMAGE_EXTENSIONS, IMAGES_DIR, LABELS_FILE, LATENTS_DIR, PACKED_DIR,  # noqa: E402
                      PACKED_FORMAT, PACKED_LABELS, PACKED_MOMENTS, ImageLatentDataset, dataset_identity, list_files,
                      load_image, packed_index_path, read_labels)
from operations.cli import ArgumentParser, InvalidInput, number, refusals, run_main, writable  # noqa: E402
from operations.files import (atomic_write, file_sha256, remove_stale_temps, temp_path_for,  # noqa: E402
                              write_images_npz)
from operations.lock import FolderInUse, RunLock  # noqa: E402
from operations.teacher_cache import (CACHE_DTYPES, SHARD_ITEMS, TeacherCacheIdentity, missing_shards,  # noqa: E402
                                      num_shards, shard_items, teacher_weights_sha256, write_identity, write_shard)
from models.vae import DEMO_VAE, RANDOM_TINY_VAE, encode_moments, load_vae  # noqa: E402

SETTINGS_FILE = "preprocess_settings.json"
DEMO_VAE_DIR = "vae"
IMAGES_PER_FOLDER = 1000  # EDM2/REPA: img00001234.png lives in folder 00001


# ---------------------------------------------------------------- file names and atomic writes

def image_relpath(index: int) -> str:
    """EDM2/REPA name of image `index`: 00012/img00012345.png."""
    return f"{index // IMAGES_PER_FOLDER:05d}/img{index:08d}.png"


def latent_relpath(image_rel: str) -> str:
    """The latent file of an image: 00012/img00012345.png -> 00012/img-mean-std-00012345.npy (other names: stem.npy);
    both sort in the same order, which is how REPA's dataset pairs them."""
    folder, name = os.path.split(image_rel)
    stem = os.path.splitext(name)[0]
    match = re.fullmatch(r"img(\d+)", stem)
    latent_name = f"img-mean-std-{match.group(1)}.npy" if match else f"{stem}.npy"
    return f"{folder}/{latent_name}" if folder else latent_name


def save_npy_atomic(array: np.ndarray, path: str) -> str:
    """Write `array` as .npy, atomically; returns the sha256 of the bytes written (what file_sha256 reads back)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    data = buffer.getvalue()
    atomic_write(path, lambda f: f.write(data))
    return hashlib.sha256(data).hexdigest()


def save_png_atomic(array: np.ndarray, path: str, compress_level: int) -> None:
    """uint8 (H, W, 3) -> PNG. compress_level 0 (EDM2's choice) trades disk for fast decoding in the data loader."""
    image = PIL.Image.fromarray(array, "RGB")
    atomic_write(path, lambda f: image.save(f, format="png", compress_level=compress_level))


def save_json_atomic(obj, path: str, indent: Optional[int] = None) -> None:
    """Write obj as JSON, atomically; a file that already holds exactly this text is left untouched, so a rerun that
    finds everything done changes no file."""
    data = json.dumps(obj, indent=indent).encode("utf8")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return
    atomic_write(path, lambda f: f.write(data))


@contextmanager
def holding(folder: str, rank: int = 0, world_size: int = 1, nested: bool = False):
    """Hold `folder` (its run.lock, operations/lock.py) while the block writes there, from process 0; every process
    learns of a refusal, so that none waits in a barrier for a command that was refused. Under the lock a temp file
    in the folder (and its subfolders, when `nested`) is a killed command's leftover, and is removed."""
    lock, refusal = None, [None]
    if rank == 0:
        try:
            lock = RunLock(folder).acquire()
        except FolderInUse as error:
            refusal = [str(error)]
    if world_size > 1:
        torch.distributed.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise FolderInUse(refusal[0])
    try:
        if rank == 0:
            removed = remove_stale_temps(folder, recursive=nested)
            if removed:
                print(f"removed {removed} stale temp file(s) of an interrupted run under {folder}")
        yield
    finally:
        if lock is not None:
            lock.release()


def check_or_write_settings(folder: str, settings: dict, must_match: Sequence[str]) -> None:
    """Record `settings` in folder/preprocess_settings.json; on resume, refuse if any `must_match` key differs."""
    path = os.path.join(folder, SETTINGS_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                previous = dict(json.load(f))
        except (OSError, ValueError, TypeError) as e:
            raise InvalidInput(f"cannot read {path} ({e}): the settings of the run that wrote {folder}; use an empty "
                               "destination, or delete the file if you know they were this command's") from e
        differing = [f"{k}: {previous.get(k)!r} before, {settings.get(k)!r} now"
                     for k in must_match if previous.get(k) != settings.get(k)]
        if differing:
            raise InvalidInput(f"{folder} was written by an earlier run with other settings "
                               f"({'; '.join(differing)}); use an empty destination or the same settings to resume")
    save_json_atomic(settings, path, indent=1)


def write_image_labels(images_dir: str, labels: List[Tuple[str, int]], class_names: Sequence[str]) -> None:
    """DATA/images/dataset.json: EDM2's {"labels": [[png relpath, class], ...]} plus the class names."""
    save_json_atomic({"labels": [list(entry) for entry in labels], "class_names": list(class_names)},
                     os.path.join(images_dir, LABELS_FILE))


# ---------------------------------------------------------------- convert

def center_crop_arr(image: PIL.Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion image_datasets.py): PIL image -> uint8 (image_size, image_size, C). Halve
    with BOX filtering while the short side is at least twice the target (cheap, alias-free downscaling), BICUBIC-resize
    so the short side equals the target, then crop the center."""
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=PIL.Image.Resampling.BOX)
    scale = image_size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)),
                         resample=PIL.Image.Resampling.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top:top + image_size, left:left + image_size]


def scan_class_folders(source: str) -> Tuple[List[str], List[int], List[str], int]:
    """ImageNet-style folder -> (image paths relative to source, labels, class names, files outside class folders);
    the classes are the sorted subfolder names (label k = k-th name), their images found recursively."""
    if not os.path.isdir(source):
        raise InvalidInput(f"--source {source} is not a folder")
    pil_extensions = tuple(ext for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.OPEN)
    class_names = sorted(e.name for e in os.scandir(source) if e.is_dir())
    if not class_names:
        raise InvalidInput(f"--source {source} has no class subfolders (expected ImageNet's layout "
                           f"SOURCE/<class>/<image>)")
    stray = sum(1 for e in os.scandir(source) if e.is_file())
    files, labels = [], []
    for label, name in enumerate(class_names):
        for rel in list_files(os.path.join(source, name), pil_extensions):
            files.append(f"{name}/{rel}")
            labels.append(label)
    if not files:
        raise InvalidInput(f"no images found in the class folders of {source}")
    return files, labels, class_names, stray


def _convert_one(task: Tuple[str, str, int, int]) -> Optional[str]:
    """Crop/resize one source image into its PNG; returns an error message for an unreadable image, else None."""
    source_path, dest_path, resolution, compress_level = task
    if os.path.exists(dest_path):
        return None
    try:
        with PIL.Image.open(source_path) as image:
            array = center_crop_arr(image.convert("RGB"), resolution)
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"
    save_png_atomic(array, dest_path, compress_level)
    return None


def convert(args) -> None:
    if args.resolution % 8:
        raise InvalidInput(f"--resolution {args.resolution} is not a multiple of 8 (the VAE that encodes the images "
                           "downsamples 8x)")
    files, labels, class_names, stray = scan_class_folders(args.source)
    if args.max_images is not None:
        files, labels = files[:args.max_images], labels[:args.max_images]
    with holding(args.dest, nested=True):
        check_or_write_settings(args.dest, {
            "command": "convert", "source": os.path.abspath(args.source), "resolution": args.resolution,
            "transform": "center-crop-dhariwal (ADM center_crop_arr)", "max_images": args.max_images,
            "compress_level": args.compress_level, "num_classes": len(class_names), "num_source_images": len(files),
        }, must_match=("source", "resolution", "max_images"))
        print(f"convert: {len(files)} images in {len(class_names)} classes from {args.source} -> {args.dest} "
              f"({args.resolution}x{args.resolution})")
        if stray:
            print(f"convert: ignoring {stray} file(s) at the top level of {args.source} (not inside a class folder)")

        tasks = [(os.path.join(args.source, rel), os.path.join(args.dest, image_relpath(i)), args.resolution,
                  args.compress_level) for i, rel in enumerate(files)]
        with (multiprocessing.get_context("fork").Pool(args.workers) if args.workers > 0 else nullcontext()) as pool:
            results = pool.imap(_convert_one, tasks, chunksize=64) if pool is not None else map(_convert_one, tasks)
            failed = set()
            for index, error in enumerate(tqdm(results, total=len(tasks), desc="convert", unit="img")):
                if error is not None:
                    failed.add(index)
                    tqdm.write(f"convert: skipping unreadable image {os.path.join(args.source, files[index])}: {error}")
        written = [(image_relpath(i), labels[i]) for i in range(len(files)) if i not in failed]
        write_image_labels(args.dest, written, class_names)
    print(f"convert: wrote {len(written)} images and {os.path.join(args.dest, LABELS_FILE)}")
    if failed:
        print(f"convert: skipped {len(failed)} unreadable image(s) (listed above); their indices are left "
              f"unused so the other file names do not depend on them")


# ---------------------------------------------------------------- encode

@contextmanager
def processes(device_type: str):
    """(rank, world_size, device) of this process as torchrun / accelerate launch set them, with the process group
    held while there are several. device_type: "auto" (GPU LOCAL_RANK when CUDA is available, else CPU), "cuda" or
    "cpu"."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device_type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("--device cuda, but CUDA is not available")
    if device_type == "cuda" or (device_type == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        if device.type == "cuda":
            torch.distributed.init_process_group("nccl", device_id=device)
        else:
            torch.distributed.init_process_group("gloo")
    try:
        yield rank, world_size, device
    finally:
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def labelled_images(folder: str, max_images: Optional[int] = None) -> Tuple[List[str], dict]:
    """The first max_images (all: None) sorted image paths under `folder`, and their labels from its dataset.json
    (what `convert` and `make-demo` write); every image must have one."""
    labels_path = os.path.join(folder, LABELS_FILE)
    if not os.path.isfile(labels_path):
        raise InvalidInput(f"{labels_path} not found; `convert` or `make-demo` writes it (labels keyed by PNG path)")
    image_labels, _ = read_labels(labels_path)
    files = list_files(folder, IMAGE_EXTENSIONS)[:max_images]
    if not files:
        raise InvalidInput(f"no images under {folder}")
    unlabeled = [f for f in files if f not in image_labels]
    if unlabeled:
        raise InvalidInput(f"{labels_path} has no label for {os.path.join(folder, unlabeled[0])} "
                           f"({len(unlabeled)} image(s) unlabeled)")
    return files, image_labels


class _ImageFiles(torch.utils.data.Dataset):
    """Loads the images to encode: item = (position in `files`, uint8 (3, H, W), sha256 of the file); all must be
    size x size."""

    def __init__(self, root: str, files: Sequence[str], size: int):
        self.root, self.files, self.size = root, list(files), size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = os.path.join(self.root, self.files[index])
        image = load_image(path)
        if image.shape[1:] != (self.size, self.size):
            raise InvalidInput(f"image {path} is {image.shape[2]}x{image.shape[1]}, but the first image is "
                               f"{self.size}x{self.size}: all images of a dataset must have one size")
        return index, torch.from_numpy(np.ascontiguousarray(image)), file_sha256(path)  # read again: page cache


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def run_encode(source: str, dest: str, vae_name: str, batch_size: int, workers: int,
               max_images: Optional[int] = None, allow_download: bool = False, device_type: str = "auto") -> None:
    """Encode source/*.png into dest/*.npy (float32 [mean | std]) and dest/dataset.json with the labels and the
    dataset identity (docs/data.md); process r of W encodes images r, r + W, ... that are not done yet, and hashes
    those done before."""
    with processes(device_type) as (rank, world_size, device):
        is_main = rank == 0
        files, image_labels = labelled_images(source, max_images)
        size = load_image(os.path.join(source, files[0])).shape[1]
        if size % 8:
            raise InvalidInput(f"image size {size} of {files[0]} is not a multiple of 8 (the VAE downsamples 8x)")

        with holding(dest, rank, world_size, nested=True):
            if is_main:
                check_or_write_settings(dest, {
                    "command": "encode", "source": os.path.abspath(source), "vae": vae_name,
                    "moments": "float32 [posterior mean | posterior std] of the VAE latents (unscaled)",
                    "batch_size": batch_size, "world_size": world_size, "max_images": max_images,
                    "num_images": len(files), "resolution": size,
                }, must_match=("vae", "source"))
            _barrier(world_size)

            shard = files[rank::world_size]
            pending = [f for f in shard if not os.path.isfile(os.path.join(dest, latent_relpath(f)))]
            if is_main:
                print(f"encode: {len(files)} images, {world_size} process(es) on {device.type}; "
                      f"{len(shard) - len(pending)} of rank 0's {len(shard)} already done")
            hashes = {}  # image relpath -> (sha256 of the image file, sha256 of its latent file)
            # closed before an error propagates: the error, not the bar, is the last line the user sees
            with tqdm(total=len(shard), initial=len(shard) - len(pending), desc="encode (rank 0)", unit="img",
                      disable=not is_main) as progress:
                if pending:
                    with refusals("--vae"):
                        vae = load_vae(vae_name, allow_download=allow_download)
                    vae = vae.to(device)
                    loader = torch.utils.data.DataLoader(_ImageFiles(source, pending, size), batch_size=batch_size,
                                                         num_workers=workers, pin_memory=device.type == "cuda")
                    for indices, images, image_sha256 in loader:
                        moments = encode_moments(vae, images.to(device, non_blocking=True)).cpu().numpy()
                        for index, moment, image_sha in zip(indices.tolist(), moments, image_sha256):
                            path = os.path.join(dest, latent_relpath(pending[index]))
                            hashes[pending[index]] = (image_sha, save_npy_atomic(moment, path))
                        progress.update(len(indices))
            for f in tqdm([f for f in shard if f not in hashes], desc="hash finished items (rank 0)", unit="img",
                          disable=not is_main):
                hashes[f] = (file_sha256(os.path.join(source, f)), file_sha256(os.path.join(dest, latent_relpath(f))))
            if world_size > 1:
                shares = [None] * world_size
                torch.distributed.all_gather_object(shares, hashes)
                hashes = {f: pair for share in shares for f, pair in share.items()}

            if is_main:
                latents = [latent_relpath(f) for f in files]
                labels = [image_labels[f] for f in files]
                identity = dataset_identity(files, latents, labels, [hashes[f][0] for f in files],
                                            [hashes[f][1] for f in files])
                save_json_atomic({"labels": [list(entry) for entry in zip(latents, labels)], IDENTITY_KEY: identity},
                                 os.path.join(dest, LABELS_FILE))
                print(f"encode: wrote {len(files)} latents and {os.path.join(dest, LABELS_FILE)}")
            _barrier(world_size)


def encode(args) -> None:
    if not os.path.isdir(args.source):
        raise InvalidInput(f"--source {args.source} is not a folder")
    run_encode(args.source, args.dest, args.vae, args.batch_size, args.workers, args.max_images,
               args.allow_download, args.device)


# ---------------------------------------------------------------- make-demo

# One colour and one shape per class: either alone identifies the class.
DEMO_COLOURS = [(230, 40, 40), (40, 200, 60), (50, 90, 240), (240, 220, 40), (220, 60, 220),
                (40, 220, 230), (255, 140, 20), (140, 70, 230), (245, 245, 245), (150, 110, 60)]
DEMO_SHAPES = ["disc", "square", "triangle", "diamond", "plus", "ring", "hbar", "vbar", "cross", "star"]
DEMO_SUPERSAMPLING = 4  # draw large, then BOX-downsample: antialiased edges like a photo's


def _shape_polygons(shape: str, cx: float, cy: float, r: float, angle: float) -> List[List[Tuple[float, float]]]:
    """Polygons (lists of points) drawing `shape` of radius r at (cx, cy), rotated by `angle` radians."""
    def rotated(points):
        c, s = np.cos(angle), np.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    def regular(n, radius, phase=0.0):
        return [(radius * np.cos(phase + 2 * np.pi * k / n), radius * np.sin(phase + 2 * np.pi * k / n))
                for k in range(n)]

    def rect(w, h):
        return [(-w, -h), (w, -h), (w, h), (-w, h)]

    if shape == "disc":
        return [rotated(regular(48, r))]
    if shape == "square":
        return [rotated(rect(0.8 * r, 0.8 * r))]
    if shape == "triangle":
        return [rotated(regular(3, r, -np.pi / 2))]
    if shape == "diamond":
        return _shape_polygons("square", cx, cy, r, angle + np.pi / 4)
    if shape == "plus":
        return [rotated(rect(r, 0.3 * r)), rotated(rect(0.3 * r, r))]
    if shape == "hbar":
        return [rotated(rect(r, 0.35 * r))]
    if shape == "vbar":
        return [rotated(rect(0.35 * r, r))]
    if shape == "cross":
        return _shape_polygons("plus", cx, cy, r, angle + np.pi / 4)
    if shape == "star":
        points = [(r * (1.0 if k % 2 == 0 else 0.45) * np.cos(-np.pi / 2 + np.pi * k / 5),
                   r * (1.0 if k % 2 == 0 else 0.45) * np.sin(-np.pi / 2 + np.pi * k / 5)) for k in range(10)]
        return [rotated(points)]
    raise ValueError(f"unknown demo shape {shape}")


def demo_image(label: int, index: int, seed: int, resolution: int) -> np.ndarray:
    """uint8 (resolution, resolution, 3): class `label`'s shape in its colour, jittered by (seed, index)."""
    rng = np.random.default_rng([seed, index])
    big = resolution * DEMO_SUPERSAMPLING
    top, bottom = rng.uniform(0, 90, size=3), rng.uniform(0, 90, size=3)  # dark vertical gradient background
    ramp = np.linspace(0.0, 1.0, big)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp) * np.ones((1, big, 1))
    image = PIL.Image.fromarray(background.astype(np.uint8), "RGB")
    radius = big * rng.uniform(0.2, 0.32)
    cx, cy = rng.uniform(radius, big - radius, size=2)
    colour = tuple(int(v) for v in np.clip(np.array(DEMO_COLOURS[label]) + rng.integers(-25, 26, size=3), 0, 255))
    draw = PIL.ImageDraw.Draw(image)
    shape = DEMO_SHAPES[label]
    angle = rng.uniform(-0.3, 0.3)
    if shape == "ring":
        outer = _shape_polygons("disc", cx, cy, radius, angle)[0]
        inner = _shape_polygons("disc", cx, cy, 0.55 * radius, angle)[0]
        draw.polygon(outer, fill=colour)
        draw.polygon(inner, fill=tuple(int(v) for v in (top + bottom) / 2))
    else:
        for polygon in _shape_polygons(shape, cx, cy, radius, angle):
            draw.polygon(polygon, fill=colour)
    array = np.asarray(image.resize((resolution, resolution), resample=PIL.Image.Resampling.BOX)).astype(np.int16)
    noise = rng.integers(-6, 7, size=array.shape)
    return np.clip(array + noise, 0, 255).astype(np.uint8)


def make_demo(args) -> None:
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise InvalidInput("make-demo runs as a single process (it is small); start it with plain python")
    if args.resolution % 16:
        raise InvalidInput(f"--resolution must be a multiple of 16 (8x VAE, then SiT/2 and patch-14 teachers), "
                           f"got {args.resolution}")
    images_dir = os.path.join(args.dest, IMAGES_DIR)
    num_images = args.num_classes * args.images_per_class
    with holding(images_dir, nested=True):
        check_or_write_settings(images_dir, {
            "command": "make-demo", "seed": args.seed, "resolution": args.resolution, "num_classes": args.num_classes,
            "images_per_class": args.images_per_class, "num_images": num_images, "compress_level": 0,
            "classes": "label k = DEMO_COLOURS[k] + DEMO_SHAPES[k]; image i has label i % num_classes",
        }, must_match=("seed", "resolution", "num_classes", "images_per_class"))
        class_names = [f"{DEMO_SHAPES[k]}-{k}" for k in range(args.num_classes)]
        labels = []
        for index in tqdm(range(num_images), desc="make-demo images", unit="img"):
            label = index % args.num_classes  # interleaved, so every prefix of the sorted files is class-balanced
            path = os.path.join(images_dir, image_relpath(index))
            if not os.path.isfile(path):
                save_png_atomic(demo_image(label, index, args.seed, args.resolution), path, compress_level=0)
            labels.append((image_relpath(index), label))
        write_image_labels(images_dir, labels, class_names)
    run_encode(images_dir, os.path.join(args.dest, LATENTS_DIR), args.vae, args.batch_size, workers=0,
               device_type=args.device)
    if args.vae == RANDOM_TINY_VAE:
        vae_dir = os.path.join(args.dest, DEMO_VAE_DIR)
        load_vae(args.vae).save_pretrained(vae_dir)
        print(f"make-demo: saved the VAE that encoded the latents to {vae_dir} (point --vae there to decode)")
    print(f"make-demo: {num_images} images, {args.num_classes} classes, {args.resolution}px in {args.dest}")


# ---------------------------------------------------------------- reference

def reference(args) -> None:
    """DATA/images and its dataset.json (what `convert` and `make-demo` write) -> a reference .npz (arr_0 uint8
    N x H x W x 3, arr_1 labels) for the evaluators. It reads no latents: a 50K reference at 512 px needs `convert`
    only."""
    images_dir = os.path.join(args.data_dir, IMAGES_DIR)
    files, image_labels = labelled_images(images_dir)
    count = len(files) if args.max_images is None else min(args.max_images, len(files))
    # Evenly spread over the sorted files, so that a capped reference batch still covers every class folder.
    chosen = [files[i] for i in np.linspace(0, len(files) - 1, count).round().astype(int)]
    side = load_image(os.path.join(images_dir, chosen[0])).shape[1]

    def read(relpath):
        image = load_image(os.path.join(images_dir, relpath))
        if image.shape[1:] != (side, side):
            raise InvalidInput(f"image {os.path.join(images_dir, relpath)} is {image.shape[2]}x{image.shape[1]}, but "
                               f"{chosen[0]} is {side}x{side}: a reference batch has one size")
        return image.transpose(1, 2, 0)

    images = (read(f) for f in chosen)
    labels = np.array([image_labels[f] for f in chosen])
    write_images_npz(args.out, images, count, (side, side, 3), labels, desc="reference images")
    print(f"reference: {count} of {len(files)} images of {images_dir} ({side}x{side}) -> {args.out}")


# ---------------------------------------------------------------- pack and cache-teachers

def pack(args) -> None:
    """DATA/vae-sd/*.npy + dataset.json -> DATA/packed (erw/data.py): one memory-mappable moments file, the labels
    and an index with the dataset identity, written atomically, the index last (a folder without it is not a packed
    dataset). A pack that no longer describes vae-sd/ is written again."""
    index_path = packed_index_path(args.data_dir)
    if os.path.isfile(index_path):
        try:
            ImageLatentDataset(args.data_dir, load_images=False)  # checks the pack, against vae-sd/ where it is
            print(f"pack: {args.data_dir} is packed already ({index_path} describes its data)")
            return
        except ValueError as error:
            print(f"pack: packing again, as training would refuse the pack: {error}")
    dataset = ImageLatentDataset(args.data_dir, load_images=False, read_packed=False)
    identity = dataset.identity("pack")
    out = os.path.join(args.data_dir, PACKED_DIR)
    with holding(out):
        if os.path.isfile(index_path):
            os.remove(index_path)  # from here until the new index, the folder is not packed: no reader mixes the two
        moments_path = os.path.join(out, PACKED_MOMENTS)
        tmp = temp_path_for(moments_path)
        try:  # a refused item must not leave a full-size temp file behind (42 GB for ImageNet)
            packed = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                               shape=(len(dataset), *dataset.moments_shape))
            loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=args.workers)
            start = 0
            for _, moments, _ in tqdm(loader, desc="pack", unit="batch"):
                packed[start:start + len(moments)] = moments.numpy()
                start += len(moments)
            packed.flush()
            del packed
            os.replace(tmp, moments_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        atomic_write(os.path.join(out, PACKED_LABELS), lambda f: np.save(f, dataset.labels))
        index = {"format": PACKED_FORMAT, "num_items": len(dataset), "resolution": dataset.resolution,
                 "moments": f"float32 {(len(dataset), *dataset.moments_shape)} [posterior mean | std], per-file order",
                 IDENTITY_KEY: identity, "image_files": dataset.image_files, "latent_files": dataset.latent_files}
        save_json_atomic(index, index_path)
    size = os.path.getsize(moments_path) / 2 ** 30
    print(f"pack: {len(dataset)} items of {args.data_dir} -> {out} ({size:.2f} GiB of moments)")


def cache_teachers(args) -> None:
    """The teachers' tokens of every image of DATA -> a teacher cache (operations/teacher_cache.py)."""
    from models.encoders import load_teachers, teacher_names
    with processes(args.device) as (rank, world_size, device):
        dataset = ImageLatentDataset(args.data_dir, load_images=True)
        images_sha256 = dataset.identity("cache-teachers")["images_sha256"]
        with refusals("--enc-type/--enc-weights"):
            teachers = [t.to(device) for t in load_teachers(args.enc_type, dataset.resolution, args.enc_weights)]
            names = teacher_names(args.enc_type)
        preprocessing = " | ".join(t.preprocessing for t in teachers)
        identity = TeacherCacheIdentity(
            teachers=names, weights_sha256=teacher_weights_sha256(args.enc_type, args.enc_weights),
            widths=[t.embed_dim for t in teachers], tokens=teachers[0].num_tokens, resolution=dataset.resolution,
            preprocessing=preprocessing, dtype=args.dtype, num_images=len(dataset), images_sha256=images_sha256,
            shard_items=args.shard_items)
        with holding(args.out, rank, world_size):
            if rank == 0:
                write_identity(args.out, identity)
            _barrier(world_size)
            _write_cache(args, dataset, teachers, identity, rank, world_size, device)


def _write_cache(args, dataset, teachers, identity, rank: int, world_size: int, device: torch.device) -> None:
    """The shards this process writes: r, r + W, ... of those missing."""
    mine = [s for s in missing_shards(args.out, identity) if s % world_size == rank]
    total = num_shards(identity)
    if rank == 0:
        print(f"cache-teachers: {len(dataset)} images, {total} shards, {world_size} process(es) on "
              f"{device.type}; rank 0 has {len(mine)} shard(s) to write")
    dtype = CACHE_DTYPES[args.dtype]
    with tqdm(total=sum(len(shard_items(identity, s)) for s in mine), desc="cache-teachers (rank 0)", unit="img",
              disable=rank != 0) as progress:
        for shard in mine:  # shard by shard, so that a shard's batches do not depend on the process count
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard_items(identity, shard)),
                                                 batch_size=args.batch_size, num_workers=args.workers,
                                                 pin_memory=device.type == "cuda")
            rows = []
            with torch.no_grad():
                for images, _, _ in loader:
                    images = images.to(device, non_blocking=True)
                    rows.append(torch.cat([teacher(images).float() for teacher in teachers], dim=-1).cpu().numpy())
                    progress.update(len(images))
            write_shard(args.out, shard, np.concatenate(rows).astype(dtype))
    _barrier(world_size)
    if rank == 0:
        left = missing_shards(args.out, identity)
        if left:
            raise RuntimeError(f"{len(left)} shard(s) missing after caching, e.g. {left[0]}")
        print(f"cache-teachers: {total} shards of {identity.tokens} x {sum(identity.widths)} {args.dtype} tokens "
              f"per image -> {args.out}")
    _barrier(world_size)


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{convert,encode,make-demo,reference,pack,cache-teachers}")

    p = commands.add_parser("convert", help="ImageNet-style folder -> DATA/images PNGs",
                            description="""\
ImageNet-style folder (a subfolder per class; labels by sorted name) -> DEST/00000/img00000000.png ... with ADM's
center crop, and DEST/dataset.json. Unreadable images are named and skipped; a rerun resumes (docs/data.md).

  python -m preprocessing.dataset_tools convert --source ILSVRC/Data/CLS-LOC/train --dest data/imagenet256/images""")
    p.add_argument("--source", required=True, metavar="DIR", help="folder with one subfolder of images per class")
    p.add_argument("--dest", required=True, metavar="DIR", type=writable(folder=True),
                   help="output images folder, e.g. DATA/images")
    p.add_argument("--resolution", type=number("[8, inf)"), default=256,
                   help="output side in pixels, a multiple of 8 (256 or 512 in the paper)")
    p.add_argument("--max-images", type=number("[1, inf)"), default=None, metavar="N",
                   help="only the first N images (sorted; default: all)")
    p.add_argument("--workers", type=number("[0, inf)"), default=min(8, os.cpu_count() or 1),
                   help="decoding/resizing processes (0 = in this process)")
    p.add_argument("--compress-level", type=int, default=0, choices=range(10), metavar="0-9",
                   help="PNG zlib level; 0 (EDM2's default) is largest on disk and fastest to load")
    p.set_defaults(func=convert)

    p = commands.add_parser("encode", help="DATA/images -> DATA/vae-sd latents",
                            description="""\
SOURCE's images -> DEST/00000/img-mean-std-00000000.npy ... (float32 SD-VAE posterior mean and std) and
DEST/dataset.json with the dataset identity; resumable, data-parallel under torchrun (docs/data.md).

  torchrun --nproc_per_node 8 -m preprocessing.dataset_tools encode --source DATA/images --dest DATA/vae-sd""")
    p.add_argument("--source", required=True, metavar="DIR", help="images folder written by convert")
    p.add_argument("--dest", required=True, metavar="DIR", type=writable(folder=True),
                   help="output latents folder, e.g. DATA/vae-sd")
    p.add_argument("--vae", "--model-url", default="stabilityai/sd-vae-ft-mse", metavar="NAME",
                   help="diffusers VAE: local folder, hub id (read from the local cache), or random-tiny "
                        "(default: %(default)s, as REPA)")
    p.add_argument("--allow-download", action="store_true", help="fetch a hub --vae that is not cached locally")
    p.add_argument("--batch-size", type=number("[1, inf)"), default=64, help="images per VAE call, per process")
    p.add_argument("--workers", type=number("[0, inf)"), default=min(8, os.cpu_count() or 1),
                   help="PNG-loading workers per process")
    p.add_argument("--max-images", type=number("[1, inf)"), default=None, metavar="N",
                   help="only the first N images (sorted; default: all)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: GPU number LOCAL_RANK when CUDA is available, else CPU")
    p.set_defaults(func=encode)

    p = commands.add_parser("make-demo", help="small generated dataset, fully offline",
                            description="""\
A small deterministic dataset in the same format (DEST/images, DEST/vae-sd): class k is a shape in a colour of its
own (docs/demo.md); with --vae random-tiny the VAE that encoded is saved to DEST/vae.

  python -m preprocessing.dataset_tools make-demo --dest data/demo""")
    p.add_argument("--dest", required=True, metavar="DIR", type=writable(folder=True), help="output data folder")
    p.add_argument("--resolution", type=number("[16, inf)"), default=64,
                   help="image side in pixels, a multiple of 16 (64 -> 8x8 latents)")
    p.add_argument("--num-classes", type=number(f"[2, {len(DEMO_SHAPES)}]"), default=10,
                   help=f"number of classes (2..{len(DEMO_SHAPES)})")
    p.add_argument("--images-per-class", type=number("[1, inf)"), default=32, help="images of each class")
    p.add_argument("--seed", type=number("[0, inf)"), default=0,
                   help="draws every image's position, size, colour and noise")
    p.add_argument("--vae", default=DEMO_VAE, metavar="NAME",
                   help=f"VAE that encodes the latents: {DEMO_VAE} (trained, assets/demo/vae), {RANDOM_TINY_VAE} "
                        "(random weights, tests) or a diffusers folder")
    p.add_argument("--batch-size", type=number("[1, inf)"), default=64, help="images per VAE call")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where the VAE runs (auto: GPU when available)")
    p.set_defaults(func=make_demo)

    p = commands.add_parser("reference", help="a data folder's images -> reference .npz",
                            description="""\
A data folder's images as a reference batch for the evaluators (arr_0 uint8 N x H x W x 3, arr_1 the labels); for
ImageNet use ADM's VIRTUAL_imagenet256_labeled.npz instead (docs/data.md).

  python -m preprocessing.dataset_tools reference --data-dir data/demo --out data/demo/reference.npz""")
    p.add_argument("--data-dir", required=True, metavar="DIR", help="data folder with images/ and vae-sd/")
    p.add_argument("--out", required=True, metavar="NPZ", type=writable(), help="output .npz")
    p.add_argument("--max-images", type=number("[1, inf)"), default=None, metavar="N",
                   help="at most this many images, evenly spread over the folder (default: all)")
    p.set_defaults(func=reference)

    p = commands.add_parser("pack", help="DATA/vae-sd -> DATA/packed (memory-mapped)",
                            description="""\
DATA/vae-sd -> DATA/packed (moments.npy, read through a memory map; labels.npy; index.json): the same batches, bit
for bit, without a file per item (docs/data.md).

  python -m preprocessing.dataset_tools pack --data-dir data/imagenet256""")
    p.add_argument("--data-dir", required=True, metavar="DIR", help="data folder with images/ and vae-sd/")
    p.add_argument("--workers", type=number("[0, inf)"), default=min(8, os.cpu_count() or 1),
                   help=".npy-loading workers")
    p.set_defaults(func=pack)

    p = commands.add_parser("cache-teachers", help="the teachers' tokens of every image, computed once",
                            description="""\
The teachers' patch tokens of every image of DATA, computed once into OUT, for training with --teacher-cache OUT;
resumable, data-parallel under torchrun. Disk: 504 GB in float16 for ImageNet-1k, DINOv2-B, 256 px (docs/data.md).

  torchrun --nproc_per_node 8 -m preprocessing.dataset_tools cache-teachers --data-dir data/imagenet256 \\
      --enc-type dinov2-vit-b --out data/imagenet256/teacher-dinov2-vit-b""")
    p.add_argument("--data-dir", required=True, metavar="DIR", help="data folder with images/ (and its latents)")
    p.add_argument("--enc-type", required=True, help="teacher(s), comma-separated, as train.py's --enc-type")
    p.add_argument("--enc-weights", default=None, help="local weight file(s), as train.py's --enc-weights "
                   "(default: none, the local torch hub / Hugging Face cache)")
    p.add_argument("--out", required=True, metavar="DIR", type=writable(folder=True), help="cache folder")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored precision")
    p.add_argument("--shard-items", type=number("[1, inf)"), default=SHARD_ITEMS, help="images per shard (per file)")
    p.add_argument("--batch-size", type=number("[1, inf)"), default=64, help="images per teacher call, per process")
    p.add_argument("--workers", type=number("[0, inf)"), default=min(8, os.cpu_count() or 1),
                   help="PNG-loading workers")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: GPU number LOCAL_RANK when CUDA is available, else CPU")
    p.set_defaults(func=cache_teachers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    with refusals():  # every command reads the user's files throughout: erw/data.py's refusals of them, one line
        args.func(args)


if __name__ == "__main__":
    run_main(main)
