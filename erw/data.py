"""The training dataset in REPA/EDM2's on-disk format (docs/data.md): images, VAE posterior moments and labels, per
file (images/, vae-sd/) or packed (packed/, read through a memory map); and the sampler that shards it over processes.
The folder is checked when it is opened, and each item's shapes when it is read, so that a stray file is named.
What is derived from a dataset records its identity (dataset_identity) and is used only with it.
"""
import hashlib
import json
import os
import re
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset, Sampler

from erw.batch_random import BatchRandom, derive_seed
from models.vae import vae_to_model_latents

IMAGES_DIR = "images"
LATENTS_DIR = "vae-sd"
PACKED_DIR = "packed"
PACKED_MOMENTS, PACKED_LABELS, PACKED_INDEX = "moments.npy", "labels.npy", "index.json"
PACKED_FORMAT = 2  # 1: without the dataset identity
LABELS_FILE = "dataset.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
LATENT_EXTENSION = ".npy"
MOMENT_CHANNELS = 8  # [mean (4) | std (4)]
LATENT_CHANNELS = MOMENT_CHANNELS // 2
VAE_DOWNSAMPLING = 8
IDENTITY_KEY = "identity"
IDENTITY_FIELDS = ("items_sha256", "images_sha256", "sha256")
MAKE_DATA_HINT = ("create it with `python -m preprocessing.dataset_tools convert` + `encode` (ImageNet) or "
                  "`python -m preprocessing.dataset_tools make-demo` (offline demo data)")


def list_files(root: str, extensions) -> List[str]:
    """Sorted '/'-separated relative paths of the files under `root` whose lowercase extension is in `extensions`."""
    found = []

    def _walk(directory: str, prefix: str):
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir():
                    _walk(entry.path, prefix + entry.name + "/")
                elif os.path.splitext(entry.name)[1].lower() in extensions:
                    found.append(prefix + entry.name)

    _walk(root, "")
    return sorted(found)


def _sha256_of_lines(lines: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def items_sha256(image_files: Sequence[str], latent_files: Sequence[str], labels: Sequence[int]) -> str:
    """sha256 of every item's image path, latent path and label, in order: what a run recomputes at its start from
    what it reads, to show that a recorded identity still describes the items."""
    return _sha256_of_lines(f"{image}\t{latent}\t{int(label)}"
                            for image, latent, label in zip(image_files, latent_files, labels))


def dataset_identity(image_files: Sequence[str], latent_files: Sequence[str], labels: Sequence[int],
                     image_sha256: Sequence[str], latent_sha256: Sequence[str]) -> Dict[str, str]:
    """What identifies a dataset's content (docs/data.md), from the sha256 of every image and latent file, which
    `encode` takes of the bytes it reads and writes: items_sha256 (paths and labels), images_sha256 (image paths and
    bytes, what a teacher cache is made from) and sha256 (all of it, what packed latents are made from)."""
    return {"items_sha256": items_sha256(image_files, latent_files, labels),
            "images_sha256": _sha256_of_lines(f"{image}\t{sha}" for image, sha in zip(image_files, image_sha256)),
            "sha256": _sha256_of_lines(f"{image}\t{image_sha}\t{latent}\t{latent_sha}\t{int(label)}"
                                       for image, image_sha, latent, latent_sha, label
                                       in zip(image_files, image_sha256, latent_files, latent_sha256, labels))}


def _identity_record(value, path: str) -> Optional[Dict[str, str]]:
    """A recorded dataset identity (None where none is recorded), checked for its fields."""
    if value is None:
        return None
    if not (isinstance(value, dict) and sorted(value) == sorted(IDENTITY_FIELDS)
            and all(isinstance(v, str) for v in value.values())):
        raise ValueError(f"{path}: its {IDENTITY_KEY} is {json.dumps(value)[:200]}, not the strings "
                         f"{', '.join(IDENTITY_FIELDS)} that `preprocessing.dataset_tools` writes")
    return value


def read_labels(path: str) -> Tuple[dict, Optional[Dict[str, str]]]:
    """({relative path: int class}, the recorded dataset identity or None) from an EDM2/REPA dataset.json; refuses
    labels that are not class indices and a file labelled twice with different classes."""
    try:
        with open(path, "r") as f:
            content = json.load(f)
        pairs = [(str(relpath), label) for relpath, label in content["labels"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read labels from {path} (expected {{\"labels\": [[relpath, class], ...]}}): "
                         f"{e}") from e
    labels = {}
    for relpath, label in pairs:
        # int() would read 3.7 as class 3, and bool is an int subclass: both would train on a wrong class silently.
        if type(label) is not int or label < 0:
            raise ValueError(f"{path}: the label of {relpath} is {json.dumps(label)}, not an integer class index "
                             f">= 0; fix the file or regenerate it with `preprocessing/dataset_tools.py` "
                             f"(which writes ints)")
        if labels.setdefault(relpath, label) != label:
            raise ValueError(f"{path} labels {relpath} twice, as {labels[relpath]} and as {label}; which one is "
                             f"right cannot be told from the file: fix it or regenerate it with "
                             f"`preprocessing/dataset_tools.py`")
    return labels, _identity_record(content.get(IDENTITY_KEY), path)


def _pair_key(relpath: str) -> Tuple[str, str]:
    """(folder, trailing image number) shared by `00000/img00000012.png` and `00000/img-mean-std-00000012.npy`."""
    folder, name = os.path.split(relpath)
    stem = os.path.splitext(name)[0]
    number = re.search(r"(\d+)$", stem)
    return folder, number.group(1) if number else stem


def packed_index_path(data_dir: str) -> str:
    return os.path.join(data_dir, PACKED_DIR, PACKED_INDEX)


def check_data_dir(data_dir: str, need_images: bool = True, read_packed: bool = True) -> None:
    """Raise FileNotFoundError naming what is missing: the per-file layout needs images/, vae-sd/ and its
    dataset.json; a packed folder needs only packed/ (and images/ when need_images); read_packed=False: the per-file
    layout of a packed folder."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data folder {data_dir} does not exist; {MAKE_DATA_HINT}")
    if read_packed and os.path.isfile(packed_index_path(data_dir)):
        if need_images and not os.path.isdir(os.path.join(data_dir, IMAGES_DIR)):
            raise FileNotFoundError(f"data folder {data_dir} has packed latents but no {IMAGES_DIR}/ subfolder, which "
                                    "a live teacher reads; give --teacher-cache, or restore the images")
        return
    for required in (IMAGES_DIR, LATENTS_DIR):
        if not os.path.isdir(os.path.join(data_dir, required)):
            raise FileNotFoundError(f"data folder {data_dir} has no {required}/ subfolder; {MAKE_DATA_HINT}")
    labels_path = os.path.join(data_dir, LATENTS_DIR, LABELS_FILE)
    if not os.path.isfile(labels_path):
        raise FileNotFoundError(f"missing labels file {labels_path} (written at the end of "
                                f"`preprocessing/dataset_tools.py encode`; was it interrupted?)")


def load_image(path: str) -> np.ndarray:
    """uint8 (3, H, W) RGB array from an image file."""
    try:
        with PIL.Image.open(path) as image:
            array = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return array.transpose(2, 0, 1)


def load_moments(path: str) -> np.ndarray:
    """float32 posterior moments from a .npy file; the caller checks that they are (8, h, w) = [mean | std]."""
    try:
        return np.load(path).astype(np.float32, copy=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read latent file {path}: {e}") from e


class ImageLatentDataset(Dataset):
    """Items: (image uint8 (3, H, W), moments float32 (8, H/8, W/8), label int64 scalar), sorted by relative path;
    with load_images=False the image is an empty uint8 (0,) tensor and no PNG is read; with a teacher_cache
    (operations/teacher_cache.py) the first slot holds the image's cached teacher tokens (T, D) instead.
    Attributes: image_files, latent_files (relative paths), labels (int64 array), num_classes, resolution, packed
    (whether packed/ is read), and the shapes every item must have (the first item's): image_shape (3, R, R),
    moments_shape (8, R/8, R/8)."""

    def __init__(self, data_dir: str, load_images: bool = True, teacher_cache=None, read_packed: bool = True):
        self.teacher_cache = teacher_cache
        # Only a live teacher looks at the pixels; a run without one (plain SiT, or a teacher cache) would decode
        # every PNG for nothing.
        self.load_images = load_images and teacher_cache is None
        check_data_dir(data_dir, need_images=self.load_images, read_packed=read_packed)
        self.data_dir = data_dir
        self.images_dir = os.path.join(data_dir, IMAGES_DIR)
        self.latents_dir = os.path.join(data_dir, LATENTS_DIR)
        self.packed = read_packed and os.path.isfile(packed_index_path(data_dir))
        if self.packed:
            self._open_packed()
        else:
            self.image_files = list_files(self.images_dir, IMAGE_EXTENSIONS)
            self.latent_files = list_files(self.latents_dir, (LATENT_EXTENSION,))
            if not self.latent_files:
                raise ValueError(f"no {LATENT_EXTENSION} latent files under {self.latents_dir}; {MAKE_DATA_HINT}")
            self._check_pairs()
            self.labels, self._identity = self._read_labels(os.path.join(self.latents_dir, LABELS_FILE))
            self.resolution = self._check_first_item()
        self.num_classes = int(self.labels.max()) + 1
        # Every item must have the first one's shapes. __getitem__ compares them (a tuple comparison, nothing read),
        # so that a stray file is named instead of failing in default_collate as "stack expects ... equal size".
        self.image_shape = (3, self.resolution, self.resolution)
        latent_size = self.resolution // VAE_DOWNSAMPLING
        self.moments_shape = (MOMENT_CHANNELS, latent_size, latent_size)

    def identity(self, needed_by: str) -> Dict[str, str]:
        """The dataset identity (dataset_identity) that `needed_by` (a command or flag) records or checks. Refused,
        saying how to get one, where the folder records none, or one of other items than it holds now."""
        if self.packed:
            return self._identity  # shown to be the pack's items when it was opened
        labels_path = os.path.join(self.latents_dir, LABELS_FILE)
        rerun = (f"run `python -m preprocessing.dataset_tools encode --source {self.images_dir} --dest "
                 f"{self.latents_dir}` with the --vae that encoded them (it finds the latents done and hashes them)")
        if self._identity is None:
            raise ValueError(f"{needed_by} needs the dataset identity of {self.data_dir}, and {labels_path} records "
                             f"none (it was written by another tool or an older version); {rerun}")
        if self._identity["items_sha256"] != items_sha256(self.image_files, self.latent_files, self.labels):
            raise ValueError(f"{needed_by} needs the dataset identity of {self.data_dir}, and the one {labels_path} "
                             "records is of other items than the folder holds (files or labels changed since "
                             f"`encode` wrote it); {rerun}")
        return self._identity

    def fingerprint(self) -> Dict[str, object]:
        """What a resumed run checks it goes on training on: the item count, every item's paths and label, and the
        recorded identity of the bytes where the folder has one (None otherwise)."""
        return {"dataset_len": len(self), "items_sha256": items_sha256(self.image_files, self.latent_files,
                                                                        self.labels),
                "dataset_sha256": (self._identity or {}).get("sha256")}

    def _open_packed(self) -> None:
        """The packed layout: its index, labels and the moments' memory map (mapped again in each DataLoader
        worker, see __getstate__), all checked now: against each other, against the items the pack recorded, and
        against vae-sd/ while that is there."""
        index_path = packed_index_path(self.data_dir)
        labels_path = os.path.join(self.data_dir, PACKED_DIR, PACKED_LABELS)
        repack = f"rerun `python -m preprocessing.dataset_tools pack --data-dir {self.data_dir}`"
        try:
            with open(index_path) as f:
                index = json.load(f)
            self.image_files, self.latent_files = list(index["image_files"]), list(index["latent_files"])
            self.resolution = int(index["resolution"])
            version, identity = index.get("format"), index.get(IDENTITY_KEY)
            labels = np.load(labels_path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"cannot read the packed dataset {index_path}: {e}; {repack}") from e
        if version != PACKED_FORMAT or identity is None:
            raise ValueError(f"{index_path} records no dataset identity (an older version of pack wrote it); "
                             f"{repack}")
        self._identity = _identity_record(identity, index_path)
        # The per-file layout refuses these when it reads dataset.json; here they would pass until drawn.
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{labels_path} holds {labels.dtype} {labels.shape}, not integer class indices; "
                             f"{repack}")
        self.labels = labels.astype(np.int64)
        self._moments = None
        moments = self._packed_moments()
        latent = self.resolution // VAE_DOWNSAMPLING
        expected = (len(self.latent_files), MOMENT_CHANNELS, latent, latent)
        if moments.shape != expected or moments.dtype != np.float32 or self.labels.shape != (expected[0],):
            raise ValueError(f"packed dataset in {os.path.join(self.data_dir, PACKED_DIR)}: moments {moments.dtype} "
                             f"{moments.shape} and labels {self.labels.shape} do not fit its index ({expected[0]} "
                             f"items of float32 {expected[1:]}); {repack}")
        if not len(self.labels):
            raise ValueError(f"packed dataset {index_path} holds no items; {repack} from a folder that holds some")
        if self.labels.min() < 0:
            bad = int(np.argmin(self.labels))
            raise ValueError(f"{labels_path} gives item {bad} ({self.latent_files[bad]}) the negative class "
                             f"{self.labels[bad]}; {repack}")
        if items_sha256(self.image_files, self.latent_files, self.labels) != self._identity["items_sha256"]:
            raise ValueError(f"{index_path} and {labels_path} do not hold the items the pack recorded (their paths "
                             f"or labels were changed after pack wrote them); {repack}")
        source = os.path.join(self.latents_dir, LABELS_FILE)
        if os.path.isfile(source):  # else the per-file latents are gone, and the pack is the data
            labels, identity = read_labels(source)
            if labels != dict(zip(self.latent_files, self.labels.tolist())):
                raise ValueError(f"{PACKED_DIR}/ of {self.data_dir} is stale: {source} labels {len(labels)} latents "
                                 f"now, and not the {len(self.labels)} items packed; {repack}")
            if identity != self._identity:
                raise ValueError(f"{PACKED_DIR}/ of {self.data_dir} is stale: {source} records "
                                 f"{'no' if identity is None else 'another'} dataset identity (vae-sd/ was encoded "
                                 f"again since it was packed); {repack}")

    def _packed_moments(self) -> np.ndarray:
        if self._moments is None:
            path = os.path.join(self.data_dir, PACKED_DIR, PACKED_MOMENTS)
            try:
                self._moments = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:  # a truncated file: "mmap length is greater than file size"
                raise ValueError(f"cannot read the packed moments {path}: {e} (truncated or damaged); rerun "
                                 f"`python -m preprocessing.dataset_tools pack --data-dir {self.data_dir}`") from e
        return self._moments

    def __getstate__(self):  # a DataLoader worker maps the packed moments itself
        return {**self.__dict__, "_moments": None} if self.packed else self.__dict__

    def _check_pairs(self) -> None:
        images = {_pair_key(f): f for f in self.image_files}
        latents = {_pair_key(f): f for f in self.latent_files}
        counts = f"{len(self.image_files)} images, {len(self.latent_files)} latents"
        for key, image in images.items():
            if key not in latents:
                raise ValueError(f"image {os.path.join(self.images_dir, image)} has no latent in {self.latents_dir} "
                                 f"({counts}); finish `preprocessing/dataset_tools.py encode` (it resumes)")
        for key, latent in latents.items():
            if key not in images:
                raise ValueError(f"latent {os.path.join(self.latents_dir, latent)} has no image in {self.images_dir} "
                                 f"({counts})")
        if len(self.image_files) != len(self.latent_files):
            raise ValueError(f"{len(self.image_files)} images in {self.images_dir} but {len(self.latent_files)} "
                             f"latents in {self.latents_dir} (file names do not identify the pairs uniquely)")
        for image, latent in zip(self.image_files, self.latent_files):
            if _pair_key(image) != _pair_key(latent):
                raise ValueError(f"sorted images and latents do not line up: {image} is paired with {latent}; "
                                 f"rename them so that both sort in the same order")

    def _read_labels(self, labels_path: str) -> Tuple[np.ndarray, Optional[Dict[str, str]]]:
        labels, identity = read_labels(labels_path)
        missing = [f for f in self.latent_files if f not in labels]
        if missing:
            raise ValueError(f"{labels_path} has no label for {missing[0]} ({len(missing)} latent files unlabeled); "
                             f"rerun `preprocessing/dataset_tools.py encode` to rewrite it")
        extra = sorted(set(labels) - set(self.latent_files))
        if extra:
            raise ValueError(f"{labels_path} labels {extra[0]}, which is not a file in {self.latents_dir} "
                             f"({len(extra)} such entries); the labels file belongs to another set of latents")
        return np.array([labels[f] for f in self.latent_files], dtype=np.int64), identity

    def _check_first_item(self) -> int:
        image = load_image(os.path.join(self.images_dir, self.image_files[0]))
        moments = load_moments(os.path.join(self.latents_dir, self.latent_files[0]))
        _, height, width = image.shape
        expected = (MOMENT_CHANNELS, height // VAE_DOWNSAMPLING, width // VAE_DOWNSAMPLING)
        if height != width or tuple(moments.shape) != expected:
            raise ValueError(f"{self.image_files[0]} ({height}x{width}) and {self.latent_files[0]} "
                             f"{tuple(moments.shape)} do not fit: expected square images and latents {expected}")
        return height

    def __len__(self) -> int:
        return len(self.latent_files)

    def __getitem__(self, index: int):
        image_path = os.path.join(self.images_dir, self.image_files[index])
        latent_path = os.path.join(self.latents_dir, self.latent_files[index])
        if self.teacher_cache is not None:
            image = self.teacher_cache.tokens(index)
        else:
            image = load_image(image_path) if self.load_images else np.zeros((0,), dtype=np.uint8)
        if self.packed:
            moments = np.array(self._packed_moments()[index])  # a copy: the map stays read-only
            latent_path = f"{os.path.join(self.data_dir, PACKED_DIR, PACKED_MOMENTS)}[{index}]"
        else:
            moments = load_moments(latent_path)
        if self.load_images and image.shape != self.image_shape:
            raise ValueError(f"image {image_path} has shape {image.shape}, expected {self.image_shape} like the "
                             f"first image {self.image_files[0]}; delete it and its latent and rerun "
                             f"`preprocessing/dataset_tools.py convert` and `encode` (they redo only missing files)")
        if moments.shape != self.moments_shape:
            raise ValueError(f"latent file {latent_path} has shape {moments.shape}, expected {self.moments_shape} "
                             f"for {self.resolution}-px images; delete it and rerun "
                             f"`preprocessing/dataset_tools.py encode` (it redoes only missing files)")
        label = torch.tensor(self.labels[index])
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(moments), label


def sample_latents(moments: torch.Tensor, generator: Optional[torch.Generator] = None,
                   rng: Optional[BatchRandom] = None) -> torch.Tensor:
    """Posterior moments (N, 8, h, w) -> model-space latents (N, 4, h, w) = (mean + std * eps) * 0.18215 + 0.
    eps comes from `rng` (training: the same for an image whatever the process count), else `generator`."""
    mean, std = moments.chunk(2, dim=1)
    if rng is not None:
        eps = rng.randn(mean.shape, device=mean.device, dtype=mean.dtype)
    else:
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return vae_to_model_latents(mean + std * eps)


class ResumableShardSampler(Sampler):
    """Endless, deterministic, per-process index stream over shuffled epochs: epoch e is a permutation seeded by
    (seed, e), of which process r takes every world-th index, cut to whole micro-batches. The stream can start at any
    micro-batch, which is how a resumed run continues mid-epoch."""

    def __init__(self, dataset_len: int, local_batch_size: int, rank: int, world_size: int, seed: int,
                 start_micro_batch: int = 0):
        self.micro_batches_per_epoch = dataset_len // (world_size * local_batch_size)
        if self.micro_batches_per_epoch == 0:
            raise ValueError(f"dataset of {dataset_len} items is smaller than one global micro-batch "
                             f"({world_size} processes x {local_batch_size}): lower --batch-size")
        self.dataset_len, self.local_batch_size = dataset_len, local_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_micro_batch = start_micro_batch

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        perm = torch.randperm(self.dataset_len, generator=g)
        return perm[self.rank::self.world_size][: self.micro_batches_per_epoch * self.local_batch_size]

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start_micro_batch, self.micro_batches_per_epoch)
        offset *= self.local_batch_size
        while True:
            yield from self.epoch_indices(epoch)[offset:].tolist()
            epoch, offset = epoch + 1, 0
