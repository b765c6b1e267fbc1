"""Teacher tokens computed once (docs/data.md): each image's frozen-teacher patch tokens on disk, read by training
instead of running the teacher (and decoding the image) at every step. Exact, not an approximation: REPA's pipeline
has no augmentation and the teachers are frozen.

    CACHE/identity.json        what the tokens are (TeacherCacheIdentity); a run refuses a cache of other settings
    CACHE/shard-00000.npy ...  (items, T, D) in the stored dtype: the images [s * S, (s + 1) * S) in item order, the
                               teachers' tokens side by side along the last axis (in --enc-type order)
"""
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch

from operations.cli import InvalidInput, MissingInput, refusals
from operations.files import atomic_write, file_sha256
from models.encoders import preprocessing_text, split_weights, teacher_names, teacher_weights_file

IDENTITY_FILE = "identity.json"
SHARD_ITEMS = 1024  # images per shard: 0.4 GB of DINOv2-B float16 tokens at 256 px, few enough files for Lustre
CACHE_DTYPES = {"float16": np.float16, "float32": np.float32}


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.npy"


@dataclass(frozen=True)
class TeacherCacheIdentity:
    """What a cache's tokens are; two caches (or a cache and a run) agree when every field does."""
    teachers: List[str]             # --enc-type names, in order
    weights_sha256: List[str]       # per teacher: sha256 of its weights file, or "random:<name>" (seeded, no file)
    widths: List[int]               # per teacher: D
    tokens: int                     # T per image
    resolution: int
    preprocessing: str              # each teacher's .preprocessing text, joined by " | "
    dtype: str                      # float16 | float32
    num_images: int
    images_sha256: str              # the dataset identity's (erw/data.py): image paths and bytes, in item order
    shard_items: int = SHARD_ITEMS

    def differences(self, other: Dict[str, object]) -> List[str]:
        """'field: cache has X, this run Y' for each field of `other` whose value differs from this identity's."""
        return [f"{field}: cache has {getattr(self, field)!r}, this run {value!r}"
                for field, value in other.items() if getattr(self, field) != value]

    def problems(self) -> List[str]:
        """What makes the fields unusable (types, ranges, per-teacher lists of unequal length)."""
        def texts(v):
            return isinstance(v, list) and all(isinstance(x, str) for x in v)

        def count(v):
            return type(v) is int and v >= 1  # bool is an int subclass, and 0 would divide by zero

        checks = {"teachers": (texts, "a list of names"), "weights_sha256": (texts, "a list of strings"),
                  "widths": (lambda v: isinstance(v, list) and all(count(x) for x in v), "a list of integers >= 1"),
                  "tokens": (count, "an integer >= 1"), "resolution": (count, "an integer >= 1"),
                  "preprocessing": (lambda v: isinstance(v, str), "a string"),
                  "dtype": (lambda v: v in CACHE_DTYPES, f"one of {', '.join(CACHE_DTYPES)}"),
                  "num_images": (count, "an integer >= 1"), "images_sha256": (lambda v: isinstance(v, str), "a string"),
                  "shard_items": (count, "an integer >= 1")}
        found = [f"{name} is {json.dumps(getattr(self, name))}, not {expected}"
                 for name, (check, expected) in checks.items() if not check(getattr(self, name))]
        if not found and not 1 <= len(self.teachers) == len(self.weights_sha256) == len(self.widths):
            found.append(f"teachers, weights_sha256 and widths have {len(self.teachers)}, {len(self.weights_sha256)} "
                         f"and {len(self.widths)} entries, not one per teacher")
        return found


def read_identity(cache_dir: str) -> TeacherCacheIdentity:
    path = os.path.join(cache_dir, IDENTITY_FILE)
    if not os.path.isfile(path):
        raise MissingInput(f"teacher cache {cache_dir} has no {IDENTITY_FILE}: not a cache, or its writing never got "
                           "started (`python -m preprocessing.dataset_tools cache-teachers`)")
    try:
        with open(path) as f:
            identity = TeacherCacheIdentity(**json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise InvalidInput(f"cannot read the teacher cache identity {path}: {e}") from e
    problems = identity.problems()
    if problems:
        raise InvalidInput(f"teacher cache identity {path}: {'; '.join(problems)}; write the cache again "
                           "(`python -m preprocessing.dataset_tools cache-teachers`)")
    return identity


def has_shards(cache_dir: str) -> bool:
    return any(re.fullmatch(r"shard-\d{5,}\.npy", name) for name in os.listdir(cache_dir))


def write_identity(cache_dir: str, identity: TeacherCacheIdentity) -> None:
    """Write the identity of a new cache, or check that an existing cache (being resumed) has this one. An identity
    beside which no shard was written yet (a command that stopped before its first shard) is replaced: it holds
    nothing that could be lost."""
    path = os.path.join(cache_dir, IDENTITY_FILE)
    if os.path.isfile(path):
        try:
            differences = read_identity(cache_dir).differences(asdict(identity))
        except InvalidInput as error:
            differences = [str(error)]
        if not differences:
            return
        if has_shards(cache_dir):
            raise InvalidInput(f"{cache_dir} holds a teacher cache of other settings ({'; '.join(differences)}); "
                               "give another --out, or delete it to rebuild")
    atomic_write(path, lambda f: f.write((json.dumps(asdict(identity), indent=1) + "\n").encode()))


def num_shards(identity: TeacherCacheIdentity) -> int:
    return -(-identity.num_images // identity.shard_items)


def shard_items(identity: TeacherCacheIdentity, shard: int) -> List[int]:
    """The dataset indices shard `shard` holds."""
    return list(range(shard * identity.shard_items, min((shard + 1) * identity.shard_items, identity.num_images)))


def missing_shards(cache_dir: str, identity: TeacherCacheIdentity) -> List[int]:
    return [s for s in range(num_shards(identity)) if not os.path.isfile(os.path.join(cache_dir, shard_name(s)))]


def write_shard(cache_dir: str, shard: int, tokens: np.ndarray) -> None:
    atomic_write(os.path.join(cache_dir, shard_name(shard)), lambda f: np.save(f, tokens))


class TeacherCache:
    """Read side: tokens(i) -> (T, D) array of image i in the stored dtype (that image i is the dataset's item i,
    teachers_from_cache checks through the identity). Shards are memory-mapped on first use in each
    process (a DataLoader worker maps its own), so reading an item opens no file."""

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        self.identity = read_identity(cache_dir)
        missing = missing_shards(cache_dir, self.identity)
        if missing:
            raise InvalidInput(f"teacher cache {cache_dir} lacks {len(missing)} of {num_shards(self.identity)} "
                               f"shards (first: {shard_name(missing[0])}): its writing was interrupted; rerun the "
                               "same `cache-teachers` command (it resumes)")
        for shard in range(num_shards(self.identity)):  # each shard's header and size, now rather than mid-run
            self._open_shard(shard)
        self._shards: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.identity.num_images

    def _open_shard(self, shard: int) -> np.ndarray:
        path = os.path.join(self.cache_dir, shard_name(shard))
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:  # a truncated file: "mmap length is greater than file size"
            raise InvalidInput(f"cannot read the teacher cache shard {path}: {e} (truncated or damaged); delete it "
                               "and rerun the `cache-teachers` command that wrote the cache (it writes what is "
                               "missing)") from e
        expected = (len(shard_items(self.identity, shard)), self.identity.tokens, sum(self.identity.widths))
        if array.shape != expected or array.dtype != CACHE_DTYPES[self.identity.dtype]:
            raise InvalidInput(f"teacher cache shard {path} is {array.dtype} {array.shape}, expected "
                               f"{self.identity.dtype} {expected} by {IDENTITY_FILE}")
        return array

    def tokens(self, index: int) -> np.ndarray:
        shard, row = divmod(index, self.identity.shard_items)
        if shard not in self._shards:
            self._shards[shard] = self._open_shard(shard)
        return np.array(self._shards[shard][row])  # a copy: the map stays read-only

    def __getstate__(self):  # DataLoader workers map the shards themselves
        return {**self.__dict__, "_shards": {}}


class CachedTeacher(torch.nn.Module):
    """Stands in for a teacher when the tokens come from a cache: the dataset puts each image's cached tokens
    (N, T, D_all) where the images would be, and this returns this teacher's slice as float32, as a live teacher
    returns its tokens."""

    def __init__(self, name: str, offset: int, embed_dim: int, num_tokens: int):
        super().__init__()
        self.name, self.offset, self.embed_dim, self.num_tokens = name, offset, embed_dim, num_tokens

    def forward(self, cached: torch.Tensor) -> torch.Tensor:
        return cached[..., self.offset:self.offset + self.embed_dim].float()

    def extra_repr(self) -> str:
        return f"name={self.name}, cached tokens [{self.offset}:{self.offset + self.embed_dim}]"


def cached_teachers(identity: TeacherCacheIdentity) -> List[CachedTeacher]:
    offsets = np.cumsum([0] + identity.widths[:-1]).tolist()
    return [CachedTeacher(name, offset, width, identity.tokens) for name, offset, width in
            zip(identity.teachers, offsets, identity.widths)]


def teacher_weights_sha256(enc_type: str, enc_weights=None) -> List[str]:
    """Per teacher of --enc-type: sha256 of the weights file it loads, or "random:<name>" for a seeded random one."""
    names = teacher_names(enc_type)
    paths = [teacher_weights_file(name, weights) for name, weights in zip(names, split_weights(enc_weights, names))]
    return [f"random:{name}" if path is None else file_sha256(path) for name, path in zip(names, paths)]


def teachers_from_cache(cache: TeacherCache, config: Dict, dataset) -> Tuple[List[CachedTeacher], str]:
    """The stand-ins of a run's teachers, once the cache's identity is shown to be the run's (its teachers, their
    weights and preprocessing, the resolution and the images); and a line for the log."""
    with refusals("--enc-type/--enc-weights"):
        names = teacher_names(config["enc_type"])
        hashes = teacher_weights_sha256(config["enc_type"], config["enc_weights"])
        preprocessing = preprocessing_text(names)
        images_sha256 = dataset.identity("--teacher-cache")["images_sha256"]
    # What the tokens are of; the dtype and shard size are the cache's own business.
    differences = cache.identity.differences({"teachers": names, "weights_sha256": hashes,
                                              "resolution": config["resolution"], "preprocessing": preprocessing,
                                              "num_images": len(dataset), "images_sha256": images_sha256})
    if differences:
        raise InvalidInput(f"--teacher-cache {cache.cache_dir} was made for other settings than this run's: "
                           f"{'; '.join(differences)}; make a cache for this run (python -m "
                           "preprocessing.dataset_tools cache-teachers) or drop --teacher-cache")
    note = (f"Teacher tokens from the cache {cache.cache_dir} ({cache.identity.dtype}, {', '.join(names)}): no teacher "
            "built, no image decoded")
    return cached_teachers(cache.identity), note
