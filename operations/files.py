"""Files written so that a crash never leaves half of one: atomic writes with the umask's permissions, and the
recognition and removal of the temp files an interrupted write left. Used for checkpoints, PNGs, YAML, JSON and the
.npz image batches the evaluator reads (write_images_npz) alike."""
import hashlib
import os
import re
import tempfile
import zipfile
from typing import IO, Callable, Iterable, Optional, Sequence

import numpy as np
from tqdm import tqdm


# What atomic_write's temp files are called: `.<final name>.<8 random characters>.tmp` (tempfile.mkstemp's
# alphabet), so that stale ones can be recognised and removed without touching anything else.
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_path_for(path: str) -> str:
    """A fresh temp name beside `path` in atomic_write's pattern (for writers that cannot use atomic_write)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{os.urandom(4).hex()}.tmp")


def atomic_write(path: str, write_fn: Callable[[IO[bytes]], None]) -> None:
    """Call write_fn on a binary temp file beside `path`, then rename it over `path`: a crash leaves the old file
    or the new one, never half of one. The file gets the mode a plain open() would give (0666 minus the umask;
    mkstemp alone gives 0600, which other users of a shared file system cannot read). Temp names follow
    `.<name>.<random>.tmp`, which no reader of ours picks up and remove_stale_temps recognises."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temps(directory: str, targets: Optional[Iterable[str]] = None, recursive: bool = False) -> int:
    """Delete the temp files an interrupted atomic_write left in `directory` (and below, if `recursive`), only
    those of our naming pattern and, when `targets` is given, only temps of those final names. Call it before
    this run writes there: a temp of a write in progress looks the same. Returns how many were removed."""
    targets = None if targets is None else set(targets)
    removed = 0
    for root, dirs, files in os.walk(directory):
        for name in files:
            match = _TEMP_NAME.match(name)
            if match and (targets is None or match.group("target") in targets):
                os.remove(os.path.join(root, name))
                removed += 1
        if not recursive:
            break
    return removed


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _zip_entry(name: str) -> zipfile.ZipInfo:
    # A fixed timestamp (np.savez stamps the current time), so equal images give a byte-identical file.
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    return info


def write_images_npz(path: str, images: Iterable[np.ndarray], num_images: int, image_shape: Sequence[int],
                     labels: np.ndarray, desc: str = "Building .npz", show_progress: bool = True) -> None:
    """Write `num_images` uint8 images of `image_shape` (H, W, 3), taken from the iterable in order, as arr_0 and
    `labels` as arr_1. An image of another shape or dtype, or too few images, is an error and leaves no file."""
    image_shape = tuple(image_shape)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (num_images, *image_shape)}
    if len(labels) != num_images:
        raise ValueError(f"{path}: {num_images} images but {len(labels)} labels")

    def write(file):
        written = 0
        with zipfile.ZipFile(file, "w", allowZip64=True) as archive:
            with archive.open(_zip_entry("arr_0.npy"), "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for image in tqdm(images, total=num_images, desc=desc, disable=not show_progress):
                    if written == num_images:
                        break
                    if image.dtype != np.uint8 or image.shape != image_shape:
                        raise ValueError(f"{path}: image {written} is {image.dtype} {image.shape}, expected uint8 "
                                         f"{image_shape}")
                    f.write(np.ascontiguousarray(image).tobytes())
                    written += 1
            if written != num_images:
                raise ValueError(f"{path}: only {written} of {num_images} images were given")
            with archive.open(_zip_entry("arr_1.npy"), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(labels, dtype=np.int64), allow_pickle=False)

    atomic_write(path, write)
