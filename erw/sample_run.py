"""The resumable multi-process run behind sample_ddp.py, and the sample folder it fills: PNGs named by index, the
.npz assembled from them, the settings .json beside them and the folder's identity (its name and the settings that
must match to resume it). Images come from erw/generation.py's one loop.
"""
import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from erw.checkpoint import REPA_MODEL_FLAG_DEFAULTS, current_model_args, load_sampling_model, numbered_checkpoint
from erw.cli import InvalidInput, check_folder_path, refusals_of_models
from erw.files import atomic_write, remove_stale_temps
from erw.generation import (all_labels, check_pixel_rounding_setting, default_micro_batch_size, exact_cpu,
                            generate_images)
from erw.npz import write_images_npz
from erw.precision import apply_precision
from erw.run_lock import FolderInUse, RunLock, describe_holder
from erw.samplers import check_guidance, check_sampler
from erw.transport import PATH_TYPES
from models.vae import load_vae

DEVICES = ("auto", "cuda", "cpu")


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
        raise InvalidInput(f"cannot read sample {path}: {e}; delete it and rerun to regenerate it") from e
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or (shape and array.shape != shape):
        raise InvalidInput(f"sample {path} is {array.dtype} {array.shape}, expected uint8 "
                           f"{shape or '(H, W, 3)'}; delete it and rerun to regenerate it")
    return array


def write_npz(npz_path: str, folder: str, num_samples: int, labels: np.ndarray, show_progress: bool = True) -> None:
    """Write arr_0 = uint8 (N, H, W, 3) from folder/000000.png.. in index order (what the ADM evaluator reads) and
    arr_1 = labels (N,) int64 (as ADM's image_sample.py). Streams one image at a time; atomic; byte-reproducible."""
    shape = _read_png(png_path(folder, 0), None).shape
    images = (_read_png(png_path(folder, i), shape) for i in range(num_samples))
    write_images_npz(npz_path, images, num_samples, shape, labels, show_progress=show_progress)


#################################################################################
#                         Multi-process generation run                          #
#################################################################################

# A sample folder belongs to the weights that made it, never to the checkpoint's path. The weights are known by their
# id (erw.checkpoint.sit_weights_id: the checkpoint_id the trainer writes into every save, shared by NNNNNNN.pt and
# the last.pt linked to it, plus /ema or /model; a hash of the weights for checkpoints without one), which is in the
# settings .json in full and, shortened, in the folder's name with the step (sample_folder_name). So last.pt and its
# numbered checkpoint resume the same folder; a last.pt that training has replaced since samples into a new folder
# (and the run names the unfinished one it leaves); a folder is never extended with other weights (check_resumable
# refuses, naming both ids); processes that loaded different weights are refused (check_same_weights). These are the
# settings that change the images: a folder is resumed only with the same values.
IDENTITY_KEYS = ("weights_id", "weights", "model_args", "path_type", "mode", "num_steps", "heun", "cfg_scale",
                 "guidance_low", "guidance_high", "global_seed", "label_mode", "vae", "precision", "pixel_rounding")
# Folders written before --pixel-rounding existed hold DiT-rounded pixels (the only convention then).
PIXEL_ROUNDING_BEFORE_THE_FLAG = "dit"


def setup_distributed(device_kind: str = "auto") -> Tuple[int, int, torch.device]:
    """(rank, world size, device); device_kind auto = cuda:LOCAL_RANK when there is a GPU, else cpu. Joins a
    process group when WORLD_SIZE > 1 (torchrun / accelerate launch set it): nccl on GPUs, gloo on the CPU."""
    if device_kind not in DEVICES:
        raise InvalidInput(f"--device must be one of {', '.join(DEVICES)}, got {device_kind!r}")
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("--device cuda: no CUDA GPU is visible")
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
        raise InvalidInput(f"the processes loaded different weights from {ckpt_path} ({listing}): the file was "
                           "replaced while they read it, as last.pt is whenever training saves; sample a numbered "
                           "checkpoint (checkpoints/NNNNNNN.pt) instead")


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
    """REPA-style descriptive folder name, e.g. SiT-XL-2-step0400000-3f2a9c1b-ema-size-256-...: the weights as the
    training step and the short weights id, never the checkpoint's file name (IDENTITY_KEYS); settings not in the
    name are still checked on resume."""
    model = str(settings["model_args"]["model"]).replace("/", "-")
    step = settings["checkpoint_step"]
    weights = (f"step{step:07d}-" if step is not None else "") + short_weights_id(settings["weights_id"])
    vae = os.path.basename(str(settings["vae"]).rstrip("/"))
    mode = settings["mode"] + ("-heun" if settings["heun"] else "")
    cfg = f"cfg-{settings['cfg_scale']}"
    if settings["cfg_scale"] > 1.0:
        cfg += f"-{settings['guidance_low']}-{settings['guidance_high']}"
    pixels = "" if settings["pixel_rounding"] == "repa" else f"-{settings['pixel_rounding']}-pixels"
    return (f"{model}-{weights}-{settings['weights']}-size-{settings['resolution']}-vae-{vae}-{mode}-"
            f"{settings['num_steps']}-{cfg}-seed-{settings['global_seed']}{pixels}")


def lock_sample_folder(folder: str, rank: int) -> Optional[RunLock]:
    """Rank 0 locks the sample folder for the run (erw/run_lock.py: one live run per folder); every rank learns
    whether it could, so that none goes on alone."""
    lock, refusal = None, None
    if rank == 0:
        try:
            lock = RunLock(folder).acquire()
        except FolderInUse as error:
            refusal = str(error)
    refusal = gather_from_ranks(refusal)[0]
    if refusal:
        raise FolderInUse(refusal)
    if lock is not None and lock.taken_over:
        print(f"note: took over {lock.path} from a run that ended without releasing it (killed): "
              f"{describe_holder(lock.taken_over)}")
    if lock is not None and not lock.locks_work:
        print(f"warning: this file system refuses file locks; only the record in {lock.path} guards the folder "
              "against a second run (README, \"File systems without working locks\")")
    return lock


def check_resumable(settings_path: str, folder: str, settings: Dict[str, object]) -> None:
    """Refuse to add samples to a folder made with other image-changing settings."""
    if not os.path.isfile(settings_path):
        if finished_indices(folder):
            raise InvalidInput(f"{folder} holds samples but {settings_path} (their settings) is missing, so they "
                               "cannot be checked against this run; move them away or use another --sample-dir")
        return
    with open(settings_path) as f:
        previous = json.load(f)
    previous.setdefault("pixel_rounding", PIXEL_ROUNDING_BEFORE_THE_FLAG)
    previous["model_args"] = current_model_args(previous.get("model_args"))
    current = json.loads(json.dumps(settings))  # the same JSON round trip as the stored copy (tuples -> lists)
    if previous.get("weights_id") != current["weights_id"]:
        raise InvalidInput(f"{folder} holds samples of the weights {previous.get('weights_id') or '(not recorded)'} "
                           f"(from {previous.get('ckpt')}), but this run's weights are {current['weights_id']} "
                           f"(from {current['ckpt']}); one .npz must come from one set of weights: use another "
                           "--sample-dir, or delete the folder to sample it again")
    diffs = [f"{k}: {previous.get(k)!r} before, {current[k]!r} now" for k in IDENTITY_KEYS
             if previous.get(k) != current[k]]
    if diffs:
        raise InvalidInput(f"{folder} was sampled with other settings ({'; '.join(diffs)}); use another "
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
        if isinstance(previous, dict):
            previous.setdefault("pixel_rounding", PIXEL_ROUNDING_BEFORE_THE_FLAG)
        if (isinstance(previous, dict) and previous.get("ckpt") == current["ckpt"]
                and previous.get("weights_id") not in (None, current["weights_id"])
                and all(previous.get(k) == current[k] for k in IDENTITY_KEYS if k != "weights_id")):
            found.append({**previous, "sample_folder": folder})
    return found


def _write_json(path: str, data: Dict[str, object]) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=True).encode()))


def run_sampling(args: Dict[str, object]) -> str:
    """The whole sample_ddp.py run for this process; args = sample_ddp.py's flags as a dict. Returns the .npz path.

    The folder is the one of these weights and settings (IDENTITY_KEYS). Every process loads the checkpoint itself,
    so all must report the same weights id. Rank 0 locks the folder (erw/run_lock.py) and removes the temp files an
    interrupted run left (this run's PNG folder, its .npz and .json), then every process lists the finished PNGs
    before any process writes and takes every world_size-th missing index; rank 0 assembles the .npz after a
    barrier.
    """
    # Every setting is checked before anything is loaded or created: a refused run leaves no folder behind.
    if args["per_proc_batch_size"] < 1 or args["num_fid_samples"] < 1 or args["num_steps"] < 1:
        raise InvalidInput("--per-proc-batch-size, --num-fid-samples and --num-steps must be >= 1")
    if args["global_seed"] < 0:
        raise InvalidInput(f"--global-seed must be >= 0, got {args['global_seed']}")
    check_folder_path(args["sample_dir"], "--sample-dir")
    check_sampler(args["mode"], args["heun"])
    check_guidance(args["cfg_scale"], args["guidance_low"], args["guidance_high"])
    check_pixel_rounding_setting(args["pixel_rounding"])
    if args["micro_batch_size"] is not None and args["micro_batch_size"] < 0:
        raise InvalidInput(f"--micro-batch-size must be >= 0 (0 = whole batch), got {args['micro_batch_size']}")
    if args["path_type"] is not None and args["path_type"] not in PATH_TYPES:
        raise InvalidInput(f"--path-type must be one of {', '.join(PATH_TYPES)}, got {args['path_type']!r}")
    rank, world_size, device = setup_distributed(args["device"])
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
        raise InvalidInput(f"the checkpoint's path type {path_type!r} is none of {', '.join(PATH_TYPES)}")
    micro_batch_size = args["micro_batch_size"]
    if micro_batch_size is None:
        micro_batch_size = default_micro_batch_size(device)
    latent_size = info["model_args"]["input_size"]

    settings = {**args, "ckpt": os.path.abspath(args["ckpt"]), "checkpoint_format": info["format"],
                "weights_id": info["weights_id"], "checkpoint_step": info["step"], "model_args": info["model_args"],
                "path_type": path_type, "resolution": latent_size * 8,
                "vae": resolve_vae_name(args["vae"], info["vae"]), "micro_batch_size": micro_batch_size,
                "world_size": world_size, "device": device.type, "torch_version": torch.__version__}
    folder = os.path.join(args["sample_dir"], sample_folder_name(settings))
    npz_path, settings_path = folder + ".npz", folder + ".json"
    settings.update(sample_folder=folder, npz=npz_path)
    with refusals_of_models("--vae"):
        vae = load_vae(settings["vae"], allow_download=args["allow_download"]).to(device)
    lock = lock_sample_folder(folder, rank)
    try:
        check_resumable(settings_path, folder, settings)
        _barrier()  # everyone has read the old settings before rank 0 replaces them
        if rank == 0:
            step = "no step recorded" if info["step"] is None else f"step {info['step']}"
            print(f"Weights {info['weights_id']} ({step}) from {settings['ckpt']}")
            for old in unfinished_runs_of_other_weights(args["sample_dir"], settings):
                old_step, numbered = old.get("checkpoint_step"), None
                if isinstance(old_step, int):
                    numbered = numbered_checkpoint(os.path.dirname(settings["ckpt"]), old_step)
                count = len(finished_indices(old['sample_folder']))
                print(f"note: {old['sample_folder']} ({count} samples, unfinished) "
                      f"was sampled from this checkpoint path when it held other weights ({old['weights_id']}"
                      f"{'' if old_step is None else f' of step {old_step}'}); this run samples the weights it holds "
                      "now into their own folder. To finish that one, sample the numbered checkpoint it came from"
                      + (f" (--ckpt {numbered})." if numbered and os.path.isfile(numbered) else "."))
            os.makedirs(folder, exist_ok=True)
            # Under the lock, before any process writes here: a temp now is a killed run's leftover. In the shared
            # --sample-dir only this run's own .npz and .json temps are ours to remove.
            removed = (remove_stale_temps(folder)
                       + remove_stale_temps(args["sample_dir"], targets=[os.path.basename(npz_path),
                                                                         os.path.basename(settings_path)]))
            if removed:
                print(f"removed {removed} temp file{'s' if removed != 1 else ''} an interrupted run left in {folder} "
                      "and beside it")
            _write_json(settings_path, settings)
        _barrier()

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
        with exact_cpu(device):
            for indices, images in generate_images(
                    model, vae, todo, global_seed=args["global_seed"], label_mode=args["label_mode"], mode=args["mode"],
                    num_steps=args["num_steps"], heun=args["heun"], path_type=path_type, cfg_scale=args["cfg_scale"],
                    guidance_low=args["guidance_low"], guidance_high=args["guidance_high"],
                    autocast_dtype=autocast_dtype, batch_size=args["per_proc_batch_size"],
                    micro_batch_size=micro_batch_size, pixel_rounding=args["pixel_rounding"], progress=rank == 0,
                    desc=f"Sampling ({world_size} proc)"):
                for index, image in zip(indices, images):
                    save_png(image, png_path(folder, index))

        _barrier()
        if rank == 0:
            missing = sorted(set(range(num_samples)) - finished_indices(folder))
            if missing:
                raise RuntimeError(f"{len(missing)} samples missing from {folder} after sampling "
                                   f"(first: {missing[:5]})")
            labels = all_labels(args["global_seed"], num_samples, model.num_classes, args["label_mode"])
            write_npz(npz_path, folder, num_samples, labels)
            size = settings["resolution"]
            print(f"Saved {npz_path}: arr_0 uint8 ({num_samples}, {size}, {size}, 3),"
                  f" arr_1 labels; settings in {settings_path}")
        # The other ranks leave without waiting for the .npz: a long build would trip NCCL's barrier timeout.
        if dist.is_initialized():
            dist.destroy_process_group()
        return npz_path
    finally:
        if lock is not None:
            lock.release()
