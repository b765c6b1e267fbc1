"""Samplers for velocity-predicting SiT models, and the resumable multi-process generation behind sample_ddp.py.

A sampler integrates a `velocity_fn(x, t, y) -> v` from noise (t = 1) to data (t = 0); x: (N, C, H, W),
t: (N,) float64 (one time for the whole batch), y: (N,) int64 labels. The state is kept in float64 as in REPA's
samplers; a model wrapper (GuidedVelocity) casts to the model's precision. Plain callables let the tests plug in
the exact velocity of a Gaussian data distribution.

Reproducibility: sample i draws its label, its starting noise and every SDE step's noise from its own
torch.Generator seeded from (global seed, i), so a sample does not depend on which process made it, in which
batch, or whether the run was interrupted. On the CPU the model and the VAE are evaluated one sample at a time
by default (`micro_batch_size=1`), because CPU kernels round a row differently depending on the batch shape, and
run_sampling uses one CPU thread, because with two threads on a loaded machine we saw decoded pixels change by one
level from run to run; then the output is bitwise independent of the batch size and the number of processes.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import zipfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from erw.checkpoint import atomic_write, load_checkpoint, load_state_dict_strict, remove_stale_temps
from erw.config import OPTIONS_BY_NAME
from erw.transport import PATH_TYPES, Path, get_path
from models.sit import SiT, create_sit

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSource = Union[torch.Generator, Sequence[torch.Generator]]

SDE_LAST_T = 0.04  # SiT/REPA: the stochastic steps stop here; one deterministic mean step goes on to t = 0.
MODES = ("sde", "ode")
LABEL_MODES = ("random", "balanced")
PRECISIONS = ("fp32", "tf32", "bf16")
WEIGHTS = ("ema", "model")
DEVICES = ("auto", "cuda", "cpu")


#################################################################################
#                                    Samplers                                   #
#################################################################################

def _check_num_steps(num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")


def sde_time_grid(num_steps: int) -> List[float]:
    """num_steps + 1 times: linspace(1, SDE_LAST_T, num_steps), then 0 (one model evaluation per interval)."""
    _check_num_steps(num_steps)
    return torch.linspace(1.0, SDE_LAST_T, num_steps, dtype=torch.float64).tolist() + [0.0]


def ode_time_grid(num_steps: int) -> List[float]:
    """num_steps + 1 times: linspace(1, 0, num_steps + 1)."""
    _check_num_steps(num_steps)
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()


def _batch_times(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)


def standard_normal(shape: Sequence[int], source: NoiseSource, device, dtype=torch.float64) -> torch.Tensor:
    """(N, ...) standard normals on `device`: from one generator for the whole batch, or from one generator per
    row (a sequence of N generators; each row then depends only on its own generator)."""
    if isinstance(source, torch.Generator):
        return torch.randn(tuple(shape), generator=source, dtype=dtype, device=source.device).to(device)
    if len(source) != shape[0]:
        raise ValueError(f"got {len(source)} per-sample generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype, device=g.device)
                        for g in source]).to(device)


@torch.no_grad()
def sample_ode(velocity_fn: VelocityFn, noise: torch.Tensor, labels: torch.Tensor, num_steps: int,
               heun: bool = False) -> torch.Tensor:
    """Probability-flow ODE from t = 1 to t = 0 on linspace(1, 0, num_steps + 1), Euler or Heun.

    noise: (N, C, H, W), labels: (N,) -> samples (N, C, H, W) in noise's dtype. Heun corrects every step except
    the last (as EDM and REPA do, the model is never called at t = 0): 2 * num_steps - 1 model evaluations.
    """
    t_grid = ode_time_grid(num_steps)
    x = noise.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = t_grid[i], t_grid[i + 1]
        dt = t_next - t_cur
        v_cur = velocity_fn(x, _batch_times(t_cur, x), labels)
        x_next = x + dt * v_cur
        if heun and i < num_steps - 1:
            v_next = velocity_fn(x_next, _batch_times(t_next, x), labels)
            x_next = x + dt * (0.5 * v_cur + 0.5 * v_next)
        x = x_next
    return x.to(noise.dtype)


@torch.no_grad()
def sample_sde(velocity_fn: VelocityFn, noise: torch.Tensor, labels: torch.Tensor, num_steps: int, path: Path,
               noise_source: NoiseSource) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time SDE  dx = [v - w_t * score] dt + sqrt(2 w_t) dW  (dt < 0).

    Diffusion coefficient w_t = sigma_t of the path (SiT's "sigma" form; t for the linear path, sin(pi t / 2) for
    the cosine path); the score comes from the velocity (Path.velocity_to_score). Times: linspace(1, 0.04,
    num_steps), num_steps - 1 stochastic steps, then one deterministic mean step from 0.04 to 0: num_steps model
    evaluations. Step noise is drawn from `noise_source` (see standard_normal).
    noise: (N, C, H, W), labels: (N,) -> samples (N, C, H, W) in noise's dtype.
    """
    t_grid = sde_time_grid(num_steps)
    x = noise.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = t_grid[i], t_grid[i + 1]
        dt = t_next - t_cur
        v = velocity_fn(x, _batch_times(t_cur, x), labels)
        # Path coefficients from one 0-dim time: every row then sees the same rounding (vectorised and scalar
        # kernels of sin/cos may differ in the last bit).
        t_scalar = torch.tensor(t_cur, dtype=torch.float64)
        w = float(path.alpha_sigma(t_scalar)[1])
        drift = v - w * path.velocity_to_score(v, x, t_scalar)
        x = x + dt * drift
        if i < num_steps - 1:
            x = x + math.sqrt(2.0 * w * abs(dt)) * standard_normal(x.shape, noise_source, x.device)
    return x.to(noise.dtype)


def check_sampler(mode: str, heun: bool) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "sde" and heun:
        raise ValueError("--heun applies to --mode ode only (the SDE sampler is Euler-Maruyama)")


def sample_batch(mode: str, velocity_fn: VelocityFn, noise: torch.Tensor, labels: torch.Tensor, num_steps: int,
                 path: Path, heun: bool = False, noise_source: Optional[NoiseSource] = None) -> torch.Tensor:
    """Dispatch to sample_sde (needs noise_source) or sample_ode; see those for shapes."""
    check_sampler(mode, heun)
    if mode == "sde":
        if noise_source is None:
            raise ValueError("the SDE sampler needs a noise source for its step noise")
        return sample_sde(velocity_fn, noise, labels, num_steps, path, noise_source)
    return sample_ode(velocity_fn, noise, labels, num_steps, heun=heun)


def model_evaluations_per_sample(mode: str, num_steps: int, heun: bool = False) -> int:
    """Calls of velocity_fn per sample (each costs one or, inside the CFG interval, two model rows)."""
    if mode == "ode" and heun:
        return 2 * num_steps - 1
    return num_steps


#################################################################################
#                        SiT as a velocity_fn, with CFG                         #
#################################################################################

def run_in_chunks(fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor], chunk_size: int
                  ) -> torch.Tensor:
    """fn over row chunks of at most chunk_size (0 = all rows at once), outputs concatenated along dim 0."""
    n = tensors[0].shape[0]
    if chunk_size <= 0 or chunk_size >= n:
        return fn(*tensors)
    return torch.cat([fn(*(x[i:i + chunk_size] for x in tensors)) for i in range(0, n, chunk_size)])


class GuidedVelocity:
    """A SiT as a velocity_fn: classifier-free guidance inside [guidance_low, guidance_high], optional autocast,
    optional micro-batching.

    Guidance v = v_uncond + cfg_scale * (v_cond - v_uncond) is applied to all latent channels, as REPA's samplers
    do (DiT/SiT's forward_with_cfg guides only the first 3 of the 4 channels, kept for reproducing DiT's numbers).
    It is active when cfg_scale > 1 and guidance_low <= t <= guidance_high for the time of that model call (for
    Heun's corrector, its own time); outside the interval the unconditional rows are not computed. The SDE drift
    is affine in v at fixed (x, t) and the guidance weights (1 - cfg_scale, cfg_scale) sum to one, so guiding v
    equals guiding the drift as REPA does. The projector heads are skipped (return_projections=False).
    """

    def __init__(self, model: SiT, cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0,
                 autocast_dtype: Optional[torch.dtype] = None, micro_batch_size: int = 0):
        if cfg_scale < 1.0:
            raise ValueError(f"--cfg-scale must be >= 1 (1 = no guidance), got {cfg_scale}")
        if not 0.0 <= guidance_low <= guidance_high <= 1.0:
            raise ValueError(f"need 0 <= --guidance-low <= --guidance-high <= 1, got {guidance_low}, {guidance_high}")
        if micro_batch_size < 0:
            raise ValueError(f"--micro-batch-size must be >= 0 (0 = whole batch), got {micro_batch_size}")
        self.model = model
        self.cfg_scale = cfg_scale
        self.guidance_low = guidance_low
        self.guidance_high = guidance_high
        self.autocast_dtype = autocast_dtype
        self.micro_batch_size = micro_batch_size

    def guided_at(self, t: float) -> bool:
        return self.cfg_scale > 1.0 and self.guidance_low <= t <= self.guidance_high

    def _model_velocity(self, x, t, y):
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return self.model(x, t, y, return_projections=False)[0].float()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W), t: (N,) all equal, y: (N,) -> v (N, C, H, W) in x's dtype."""
        guided = self.guided_at(float(t[0]))
        x_in, t_in, y_in = x.float(), t.float(), y
        if guided:
            x_in, t_in = torch.cat([x_in, x_in]), torch.cat([t_in, t_in])
            y_in = torch.cat([y, torch.full_like(y, self.model.num_classes)])
        v = run_in_chunks(self._model_velocity, (x_in, t_in, y_in), self.micro_batch_size).to(x.dtype)
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + self.cfg_scale * (v_cond - v_uncond)
        return v


#################################################################################
#                     Per-sample seeds, labels and noise                        #
#################################################################################

_UINT64 = (1 << 64) - 1
_SEED_INDEX_MULTIPLIER = 0x9E3779B1  # odd, so index -> seed is a bijection modulo 2**32


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _UINT64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _UINT64
    return x ^ (x >> 31)


def sample_seed(global_seed: int, index: int) -> int:
    """The seed of sample `index`. torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so the
    seed lives modulo 2**32: an offset hashed from the global seed plus an odd multiple of the index, which gives
    every index < 2**32 of one run its own seed."""
    if global_seed < 0 or not 0 <= index < 2 ** 32:
        raise ValueError(f"need global_seed >= 0 and 0 <= index < 2**32, got {global_seed}, {index}")
    return (_splitmix64(global_seed) + index * _SEED_INDEX_MULTIPLIER) % 2 ** 32


def sample_generator(global_seed: int, index: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(sample_seed(global_seed, index))


def draw_label(generator: torch.Generator, index: int, num_classes: int, label_mode: str) -> int:
    """random: uniform from the sample's generator (its first draw); balanced: index mod num_classes, so any
    multiple of num_classes consecutive indices holds every class equally often."""
    if label_mode == "random":
        return int(torch.randint(num_classes, (1,), generator=generator))
    if label_mode == "balanced":
        return index % num_classes
    raise ValueError(f"unknown label mode {label_mode!r}; choose one of {', '.join(LABEL_MODES)}")


def sample_inputs(global_seed: int, indices: Sequence[int], latent_shape: Sequence[int], num_classes: int,
                  label_mode: str) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Generator]]:
    """Noise (N, C, H, W) float32, labels (N,) int64, and the N generators, positioned for the SDE's step noise.
    Each sample draws its label, then its noise, from its own generator."""
    generators = [sample_generator(global_seed, i) for i in indices]
    labels = [draw_label(g, i, num_classes, label_mode) for g, i in zip(generators, indices)]
    noise = standard_normal((len(indices), *latent_shape), generators, "cpu", dtype=torch.float32)
    return noise, torch.tensor(labels, dtype=torch.int64), generators


def all_labels(global_seed: int, num_samples: int, num_classes: int, label_mode: str) -> np.ndarray:
    """Labels of samples 0..num_samples-1 (int64), without drawing their noise."""
    return np.array([draw_label(sample_generator(global_seed, i), i, num_classes, label_mode)
                     for i in range(num_samples)], dtype=np.int64)


#################################################################################
#                         Sample folder and .npz file                           #
#################################################################################

_PNG_NAME = re.compile(r"^(\d{6,})\.png$")


def png_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"{index:06d}.png")


def finished_indices(folder: str) -> set:
    """Indices whose PNG exists (PNGs are written atomically, so an existing one is complete)."""
    if not os.path.isdir(folder):
        return set()
    return {int(m.group(1)) for m in map(_PNG_NAME.match, os.listdir(folder)) if m}


def save_png(image: np.ndarray, path: str) -> None:
    """uint8 (H, W, 3) -> PNG at path, atomically, so a crash never leaves a partial file."""
    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


def _read_png(path: str, shape: Optional[Tuple[int, ...]]) -> np.ndarray:
    try:
        with Image.open(path) as img:
            array = np.asarray(img)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot read sample {path}: {e}; delete it and rerun to regenerate it") from e
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or (shape and array.shape != shape):
        raise RuntimeError(f"sample {path} is {array.dtype} {array.shape}, expected uint8 "
                           f"{shape or '(H, W, 3)'}; delete it and rerun to regenerate it")
    return array


def _zip_entry(name: str) -> zipfile.ZipInfo:
    # A fixed timestamp (np.savez stamps the current time), so equal samples give a byte-identical file.
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    return info


def write_npz(npz_path: str, folder: str, num_samples: int, labels: np.ndarray, show_progress: bool = True) -> None:
    """Write arr_0 = uint8 (N, H, W, 3) from folder/000000.png.. in index order (what the ADM evaluator reads) and
    arr_1 = labels (N,) int64 (as ADM's image_sample.py). Streams one image at a time; atomic; byte-reproducible."""
    first = _read_png(png_path(folder, 0), None)
    shape = first.shape
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (num_samples, *shape)}

    def write(file):
        with zipfile.ZipFile(file, "w", allowZip64=True) as archive:
            with archive.open(_zip_entry("arr_0.npy"), "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for i in tqdm(range(num_samples), desc="Building .npz", disable=not show_progress):
                    f.write(_read_png(png_path(folder, i), shape).tobytes())
            with archive.open(_zip_entry("arr_1.npy"), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(labels, dtype=np.int64), allow_pickle=False)

    atomic_write(npz_path, write)


#################################################################################
#                                  Checkpoints                                  #
#################################################################################

# REPA's generate.py flags that describe the model; our checkpoints carry the same facts in "model_args".
# REPA's training defaults, which are also ours (erw/config.py), plus DINOv2-B's width for the projector.
REPA_MODEL_FLAG_DEFAULTS = {**{name: OPTIONS_BY_NAME[name].default
                               for name in ("model", "resolution", "num_classes", "encoder_depth", "qk_norm")},
                            "projector_embed_dims": "768"}


def read_checkpoint(path: str) -> dict:
    """Weights-only load that also accepts the argparse.Namespace REPA's train.py pickles under "args"."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


# The trainer writes a fresh id into every checkpoint it saves (NNNNNNN.pt and its last.pt link share it). It becomes
# part of a sample folder's name, so it must be a plain token, and long enough not to be shared by chance.
_CHECKPOINT_ID = re.compile(r"[0-9A-Za-z_-]{8,}")
# sha256 runs at about 1 GB/s: above this many bytes the hash takes long enough to deserve a progress bar.
_HASH_PROGRESS_BYTES = 256 * 2 ** 20


def state_dict_sha256(state_dict: Dict[str, torch.Tensor], show_progress: bool = False) -> str:
    """sha256 over the tensors in sorted key order: each key's name, dtype, shape and raw bytes. It identifies the
    weights themselves, whatever file, path or checkpoint layout holds them."""
    tensors = [(name, state_dict[name].detach().cpu().contiguous()) for name in sorted(state_dict)]
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    digest = hashlib.sha256()
    with tqdm(total=total, unit="B", unit_scale=True, desc="Hashing the weights (checkpoint has no checkpoint_id)",
              disable=not show_progress or total < _HASH_PROGRESS_BYTES) as bar:
        for name, t in tensors:
            digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
            bar.update(t.numel() * t.element_size())
    return digest.hexdigest()


def weights_id(ckpt: dict, weights: str, ckpt_path: str, show_progress: bool = False) -> str:
    """What a sample folder is tied to: "<checkpoint_id>/<weights>" for checkpoints that carry an id, else
    "sha256:<hash of ckpt[weights]>/<weights>" (REPA's and our older checkpoints)."""
    checkpoint_id = ckpt.get("checkpoint_id")
    if checkpoint_id is None:
        return f"sha256:{state_dict_sha256(ckpt[weights], show_progress)}/{weights}"
    if not isinstance(checkpoint_id, str) or not _CHECKPOINT_ID.fullmatch(checkpoint_id):
        raise ValueError(f"checkpoint {ckpt_path} has checkpoint_id {checkpoint_id!r}; expected a string of at least "
                         "8 letters, digits, '-' or '_' (as the trainer writes, e.g. a uuid hex)")
    return f"{checkpoint_id}/{weights}"


def checkpoint_step(ckpt: dict) -> Optional[int]:
    """The training step of our checkpoints ("step") and REPA's ("steps"); None when the checkpoint has none."""
    step = ckpt.get("step", ckpt.get("steps"))
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _z_dims(flag_value: str) -> List[int]:
    try:
        return [int(z) for z in flag_value.split(",") if z.strip()]
    except ValueError:
        raise ValueError(f"--projector-embed-dims must be comma-separated integers, got {flag_value!r}") from None


def _model_args_from_flags(flags: Dict[str, object]) -> Dict[str, object]:
    """REPA's model flags (absent ones as None) -> create_sit keyword arguments implied by the given ones."""
    implied = {}
    if flags.get("model") is not None:
        implied["model"] = flags["model"]
    if flags.get("resolution") is not None:
        if flags["resolution"] % 8:
            raise ValueError(f"--resolution must be a multiple of 8 (the VAE's downsampling), "
                             f"got {flags['resolution']}")
        implied["input_size"] = flags["resolution"] // 8
    for name in ("num_classes", "encoder_depth", "qk_norm"):
        if flags.get(name) is not None:
            implied[name] = flags[name]
    if flags.get("projector_embed_dims") is not None:
        implied["z_dims"] = _z_dims(flags["projector_embed_dims"])
    return implied


def load_sampling_model(ckpt_path: str, weights: str = "ema", model_flags: Optional[Dict[str, object]] = None,
                        show_progress: bool = False) -> Tuple[SiT, Dict[str, object]]:
    """Build a SiT from a checkpoint and load `weights` ("ema" | "model") strictly.

    Ours (has "model_args"): the architecture comes from the checkpoint; model flags that are given must agree.
    REPA's ({"model", "ema", "opt", "args"}): the architecture comes from REPA's model flags (missing ones take
    REPA_MODEL_FLAG_DEFAULTS). Returns (model in eval mode, info) with info = {"format": "erw" | "repa",
    "model_args", "path_type" and "vae" (from our checkpoint's config, else None), "weights_id" (see weights_id;
    hashing a checkpoint without checkpoint_id takes about 3 s for SiT-XL/2, with a bar if show_progress), "step"
    (checkpoint_step)}.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    ckpt = read_checkpoint(ckpt_path)
    implied = _model_args_from_flags(model_flags or {})
    if "model_args" in ckpt:
        model_args = dict(ckpt["model_args"])
        if model_args.get("truncated"):
            raise ValueError(f"{ckpt_path} is a Phase-1 (warmup) checkpoint: it has no final layer and cannot "
                             "generate; sample from a Phase-2 checkpoint")
        conflicts = [f"{k}: flag gives {v!r}, checkpoint has {model_args.get(k)!r}"
                     for k, v in implied.items() if model_args.get(k) != v]
        if conflicts:
            raise ValueError(f"model flags disagree with {ckpt_path} (our checkpoints carry their architecture; "
                             f"drop the flags): " + "; ".join(conflicts))
        config = ckpt.get("config") or {}
        info = {"format": "erw", "path_type": config.get("path_type"), "vae": config.get("vae")}
    else:
        model_args = _model_args_from_flags({**REPA_MODEL_FLAG_DEFAULTS,
                                             **{k: v for k, v in (model_flags or {}).items() if v is not None}})
        info = {"format": "repa", "path_type": None, "vae": None}
    if weights not in ckpt:
        raise ValueError(f"checkpoint {ckpt_path} has no '{weights}' weights (keys: {', '.join(sorted(ckpt))})")
    model = create_sit(**model_args)
    load_state_dict_strict(model, ckpt[weights], f"{ckpt_path} ['{weights}']")
    info.update(model_args=model_args, weights_id=weights_id(ckpt, weights, ckpt_path, show_progress),
                step=checkpoint_step(ckpt))
    return model.eval().requires_grad_(False), info


#################################################################################
#                         Multi-process generation run                          #
#################################################################################

# Settings that change the images: a sample folder may only be resumed with the same values. The weights count by
# their id, not by the checkpoint's path: last.pt is replaced as training goes on, and NNNNNNN.pt and the last.pt
# linked to it are the same weights.
IDENTITY_KEYS = ("weights_id", "weights", "model_args", "path_type", "mode", "num_steps", "heun", "cfg_scale",
                 "guidance_low", "guidance_high", "global_seed", "label_mode", "vae", "precision")


def setup_distributed(device_kind: str = "auto") -> Tuple[int, int, torch.device]:
    """(rank, world size, device); device_kind auto = cuda:LOCAL_RANK when there is a GPU, else cpu. Joins a
    process group when WORLD_SIZE > 1 (torchrun / accelerate launch set it): nccl on GPUs, gloo on the CPU."""
    if device_kind not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {device_kind!r}")
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is visible")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world_size, device


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_from_ranks(obj: object) -> List[object]:
    """[rank 0's obj, rank 1's obj, ...]; [obj] without a process group."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def check_same_weights(ids_by_rank: Sequence[str], ckpt_path: str) -> None:
    """Every process loads the checkpoint itself; refuse unless all of them got the same weights."""
    if len(set(ids_by_rank)) > 1:
        listing = ", ".join(f"rank {rank}: {i}" for rank, i in enumerate(ids_by_rank))
        raise RuntimeError(f"the processes loaded different weights from {ckpt_path} ({listing}): the file was "
                           "replaced while they read it, as last.pt is whenever training saves; sample a numbered "
                           "checkpoint (checkpoints/NNNNNNN.pt) instead")


@contextlib.contextmanager
def cpu_threads(num_threads: int):
    """Run the block with torch using num_threads CPU threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def apply_precision(precision: str) -> Optional[torch.dtype]:
    """fp32: exact float32 matmuls; tf32: TF32 matmuls/convs on Ampere+; bf16: the SiT under bf16 autocast (the
    VAE stays float32 with TF32). Returns the autocast dtype for GuidedVelocity."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    allow_tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    return torch.bfloat16 if precision == "bf16" else None


def resolve_vae_name(vae_flag: Optional[str], checkpoint_vae: Optional[str]) -> str:
    """--vae: REPA's shorthand ema | mse (stabilityai/sd-vae-ft-*), a local folder, a hub id or random-tiny;
    default: the VAE named in our checkpoint's config, else sd-vae-ft-ema (the paper decodes with it)."""
    name = vae_flag or checkpoint_vae or "ema"
    return f"stabilityai/sd-vae-ft-{name}" if name in ("ema", "mse") else name


def short_weights_id(full_id: str) -> str:
    """The first 8 characters of a checkpoint id or weight hash: "3f2a9c1b" from "3f2a9c1b.../ema" or
    "sha256:3f2a9c1b.../ema"."""
    return full_id.split("/")[0].split(":")[-1][:8]


def sample_folder_name(settings: Dict[str, object]) -> str:
    """REPA-style descriptive folder name; settings not in it are still checked on resume (IDENTITY_KEYS).

    The weights appear as the training step (when the checkpoint has one) and the short weights id, not as the
    checkpoint's file name: e.g. SiT-XL-2-step0400000-3f2a9c1b-ema-size-256-..., so sampling last.pt after
    training moved it on starts another folder instead of adding to the one of the older weights."""
    model = str(settings["model_args"]["model"]).replace("/", "-")
    step = settings["checkpoint_step"]
    weights = (f"step{step:07d}-" if step is not None else "") + short_weights_id(settings["weights_id"])
    vae = os.path.basename(str(settings["vae"]).rstrip("/"))
    mode = settings["mode"] + ("-heun" if settings["heun"] else "")
    cfg = f"cfg-{settings['cfg_scale']}"
    if settings["cfg_scale"] > 1.0:
        cfg += f"-{settings['guidance_low']}-{settings['guidance_high']}"
    return (f"{model}-{weights}-{settings['weights']}-size-{settings['resolution']}-vae-{vae}-{mode}-"
            f"{settings['num_steps']}-{cfg}-seed-{settings['global_seed']}")


def check_resumable(settings_path: str, folder: str, settings: Dict[str, object]) -> None:
    """Refuse to add samples to a folder made with other image-changing settings."""
    if not os.path.isfile(settings_path):
        if finished_indices(folder):
            raise RuntimeError(f"{folder} holds samples but {settings_path} (their settings) is missing, so they "
                               "cannot be checked against this run; move them away or use another --sample-dir")
        return
    with open(settings_path) as f:
        previous = json.load(f)
    current = json.loads(json.dumps(settings))  # the same JSON round trip as the stored copy (tuples -> lists)
    if previous.get("weights_id") != current["weights_id"]:
        raise RuntimeError(f"{folder} holds samples of the weights {previous.get('weights_id') or '(not recorded)'} "
                           f"(from {previous.get('ckpt')}), but this run's weights are {current['weights_id']} "
                           f"(from {current['ckpt']}); one .npz must come from one set of weights: use another "
                           "--sample-dir, or delete the folder to sample it again")
    diffs = [f"{k}: {previous.get(k)!r} before, {current[k]!r} now" for k in IDENTITY_KEYS
             if previous.get(k) != current[k]]
    if diffs:
        raise RuntimeError(f"{folder} was sampled with other settings ({'; '.join(diffs)}); use another "
                           "--sample-dir or delete the folder")


def unfinished_runs_of_other_weights(sample_dir: str, settings: Dict[str, object]) -> List[Dict[str, object]]:
    """Settings of the unfinished runs in sample_dir that sampled the same checkpoint path with the same settings
    when it held other weights: what a rerun from last.pt finds after training replaced it."""
    found = []
    if not os.path.isdir(sample_dir):
        return found
    current = json.loads(json.dumps(settings))
    for name in sorted(os.listdir(sample_dir)):
        folder = os.path.join(sample_dir, name[: -len(".json")])
        if not name.endswith(".json") or not os.path.isdir(folder) or os.path.exists(folder + ".npz"):
            continue
        try:
            with open(folder + ".json") as f:
                previous = json.load(f)
        except (OSError, ValueError):  # only a note: a file that is not one of our settings files is skipped
            continue
        if (isinstance(previous, dict) and previous.get("ckpt") == current["ckpt"]
                and previous.get("weights_id") not in (None, current["weights_id"])
                and all(previous.get(k) == current[k] for k in IDENTITY_KEYS if k != "weights_id")):
            found.append({**previous, "sample_folder": folder})
    return found


def _write_json(path: str, data: Dict[str, object]) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=True).encode()))


def run_sampling(args: Dict[str, object]) -> str:
    """The whole sample_ddp.py run for this process; args = sample_ddp.py's flags as a dict. Returns the .npz path.

    A sample folder belongs to the weights that made it (weights_id in its settings .json and, shortened, in its
    name with the step), never to the checkpoint's path: rerunning with a last.pt that training has since replaced
    samples into a new folder (and says which unfinished folder it left), and a folder whose recorded weights
    differ from this run's is refused. Every process loads the checkpoint itself, so all must report the same
    weights id. Rank 0 removes the temp files an interrupted run left (this run's PNG folder, its .npz and .json),
    then every process lists the finished PNGs before any process writes and takes every world_size-th missing
    index; rank 0 assembles the .npz after a barrier.
    """
    rank, world_size, device = setup_distributed(args["device"])
    if args["per_proc_batch_size"] < 1 or args["num_fid_samples"] < 1 or args["num_steps"] < 1:
        raise ValueError("--per-proc-batch-size, --num-fid-samples and --num-steps must be >= 1")
    check_sampler(args["mode"], args["heun"])
    autocast_dtype = apply_precision(args["precision"])

    model_flags = {k: args[k] for k in REPA_MODEL_FLAG_DEFAULTS}
    model, info = load_sampling_model(args["ckpt"], args["weights"], model_flags, show_progress=rank == 0)
    check_same_weights(gather_from_ranks(info["weights_id"]), args["ckpt"])
    model.to(device)
    if args["compile"]:
        # Fuses the memory-bound elementwise ops between the matmuls: SiT-XL/2 bf16 forward 0.112 s -> 0.066 s
        # at batch 128 on an H100 (one compilation per batch shape, about 35 s each).
        model = torch.compile(model)
    path_type = args["path_type"] or info["path_type"] or "linear"
    if path_type not in PATH_TYPES:
        raise ValueError(f"--path-type must be one of {', '.join(PATH_TYPES)}, got {path_type!r}")
    micro_batch_size = args["micro_batch_size"]
    if micro_batch_size is None:
        micro_batch_size = 1 if device.type == "cpu" else 0
    velocity_fn = GuidedVelocity(model, args["cfg_scale"], args["guidance_low"], args["guidance_high"],
                                 autocast_dtype, micro_batch_size)
    latent_size = info["model_args"]["input_size"]
    latent_shape = (model.in_channels, latent_size, latent_size)

    settings = {**args, "ckpt": os.path.abspath(args["ckpt"]), "checkpoint_format": info["format"],
                "weights_id": info["weights_id"], "checkpoint_step": info["step"], "model_args": info["model_args"],
                "path_type": path_type, "resolution": latent_size * 8,
                "vae": resolve_vae_name(args["vae"], info["vae"]), "micro_batch_size": micro_batch_size,
                "world_size": world_size, "device": device.type, "torch_version": torch.__version__}
    folder = os.path.join(args["sample_dir"], sample_folder_name(settings))
    npz_path, settings_path = folder + ".npz", folder + ".json"
    settings.update(sample_folder=folder, npz=npz_path)
    check_resumable(settings_path, folder, settings)
    _barrier()  # everyone has read the old settings before rank 0 replaces them
    if rank == 0:
        step = "no step recorded" if info["step"] is None else f"step {info['step']}"
        print(f"Weights {info['weights_id']} ({step}) from {settings['ckpt']}")
        for old in unfinished_runs_of_other_weights(args["sample_dir"], settings):
            old_step, numbered = old.get("checkpoint_step"), None
            if isinstance(old_step, int):
                numbered = os.path.join(os.path.dirname(settings["ckpt"]), f"{old_step:07d}.pt")
            print(f"note: {old['sample_folder']} ({len(finished_indices(old['sample_folder']))} samples, unfinished) "
                  f"was sampled from this checkpoint path when it held other weights ({old['weights_id']}"
                  f"{'' if old_step is None else f' of step {old_step}'}); this run samples the weights it holds "
                  "now into their own folder. To finish that one, sample the numbered checkpoint it came from"
                  + (f" (--ckpt {numbered})." if numbered and os.path.isfile(numbered) else "."))
        os.makedirs(folder, exist_ok=True)
        # Before any process writes here: a temp of a write in progress looks the same. In the shared
        # --sample-dir only this run's own .npz and .json temps are ours to remove.
        removed = (remove_stale_temps(folder)
                   + remove_stale_temps(args["sample_dir"], targets=[os.path.basename(npz_path),
                                                                     os.path.basename(settings_path)]))
        if removed:
            print(f"removed {removed} temp file{'s' if removed != 1 else ''} an interrupted run left in {folder} "
                  "and beside it")
        _write_json(settings_path, settings)
    _barrier()

    from models.vae import decode_latents, load_vae  # diffusers is only needed once a run gets this far
    vae = load_vae(settings["vae"], allow_download=args["allow_download"]).to(device)

    num_samples = args["num_fid_samples"]
    finished = finished_indices(folder)
    _barrier()  # no process writes before every process has listed the folder
    todo = [i for i in range(num_samples) if i not in finished][rank::world_size]
    if rank == 0:
        print(f"{len(finished & set(range(num_samples)))} of {num_samples} samples already in {folder}; "
              f"{world_size} process(es) make the rest")
        if args["label_mode"] == "balanced" and num_samples % model.num_classes:
            print(f"note: {num_samples} samples are not a multiple of {model.num_classes} classes; "
                  "balanced labels differ by at most one per class")
    path = get_path(path_type)
    batch_size = args["per_proc_batch_size"]
    exact_cpu = cpu_threads(1) if device.type == "cpu" else contextlib.nullcontext()
    with exact_cpu, tqdm(total=len(todo), desc=f"Sampling ({world_size} proc)", unit="img", disable=rank != 0) as bar:
        for start in range(0, len(todo), batch_size):
            indices = todo[start:start + batch_size]
            noise, labels, generators = sample_inputs(args["global_seed"], indices, latent_shape,
                                                      model.num_classes, args["label_mode"])
            latents = sample_batch(args["mode"], velocity_fn, noise.to(device), labels.to(device),
                                   args["num_steps"], path, heun=args["heun"], noise_source=generators)
            images = run_in_chunks(lambda z: decode_latents(vae, z), (latents,), micro_batch_size).numpy()
            for index, image in zip(indices, images):
                save_png(image, png_path(folder, index))
            bar.update(len(indices))

    _barrier()
    if rank == 0:
        missing = sorted(set(range(num_samples)) - finished_indices(folder))
        if missing:
            raise RuntimeError(f"{len(missing)} samples missing from {folder} after sampling (first: {missing[:5]})")
        labels = all_labels(args["global_seed"], num_samples, model.num_classes, args["label_mode"])
        write_npz(npz_path, folder, num_samples, labels)
        print(f"Saved {npz_path}: arr_0 uint8 ({num_samples}, {settings['resolution']}, {settings['resolution']}, 3),"
              f" arr_1 labels; settings in {settings_path}")
    # The other ranks leave without waiting for the .npz: a long build would trip NCCL's barrier timeout.
    if dist.is_initialized():
        dist.destroy_process_group()
    return npz_path
