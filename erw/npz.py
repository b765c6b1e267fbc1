"""Image batches as the ADM evaluator reads them: an .npz with arr_0 = uint8 (N, H, W, 3) and arr_1 = int64 labels,
written one image at a time (a 50K-sample batch never sits in memory), atomically, and byte-reproducibly."""
import zipfile
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from erw.cli import InvalidInput
from erw.files import atomic_write


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
                        raise InvalidInput(f"{path}: image {written} is {image.dtype} {image.shape}, expected uint8 "
                                           f"{image_shape}")
                    f.write(np.ascontiguousarray(image).tobytes())
                    written += 1
            if written != num_images:
                raise ValueError(f"{path}: only {written} of {num_images} images were given")
            with archive.open(_zip_entry("arr_1.npy"), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(labels, dtype=np.int64), allow_pickle=False)

    atomic_write(path, write)
