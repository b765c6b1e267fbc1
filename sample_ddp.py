"""Samples from a SiT checkpoint for FID: a folder of PNGs and one .npz (arr_0 uint8 (N, H, W, 3), arr_1 labels)
that the ADM evaluator reads.

    torchrun --nproc_per_node 8 sample_ddp.py --ckpt exps/NAME/checkpoints/0400000.pt --cfg-scale 1.8 \\
        --guidance-high 0.7
    python sample_ddp.py --ckpt ...                      # one process

Sample i depends only on (--global-seed, i) and the sampler settings, not on the number of processes or the batch
size (bitwise with --bitwise); rerunning an interrupted command makes only the missing PNGs. Our checkpoints, REPA's
and the ERW release's load (the model comes from the checkpoint; model flags given must agree with it).

A sample folder belongs to its weights and settings: SAMPLE_DIR/<model>-step<N>-<weights hash>-<settings>/ with
<that name>.json beside it, which records the sha256 of the weights and every setting that changes the images
(IDENTITY_KEYS). A rerun resumes a folder only when all of them are the same, so one .npz never mixes weights or
settings (a last.pt that training has replaced since has another hash, hence another folder).
"""
import argparse
import json
import os
import re

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from erw.generation import LABEL_MODES, all_labels, bitwise_scope, generate_images
from erw.precision import apply_precision
from erw.transport import PATH_TYPES
from models.vae import PIXEL_ROUNDINGS, load_vae
from models.weights import weights_sha256
from operations.checkpoint import WEIGHTS, add_repa_model_flags, load_model
from operations.cli import ArgumentParser, InvalidInput, check_folder_path, number, refusals, run_main
from operations.config import SAMPLER_OPTIONS_BY_NAME, add_flags
from operations.files import atomic_write, remove_stale_temps, write_images_npz
from operations.lock import FolderInUse, RunLock

# The settings that change the images: a folder is resumed only when its .json records the same values.
IDENTITY_KEYS = ("weights_sha256", "weights", "model_args", "path_type", "mode", "num_steps", "heun", "cfg_scale",
                 "guidance_low", "guidance_high", "global_seed", "label_mode", "vae", "precision", "pixel_rounding",
                 "bitwise")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    io = parser.add_argument_group("checkpoint and output")
    io.add_argument("--ckpt", required=True, help="our checkpoint (has model_args) or a REPA-style one")
    io.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA weights (default) or the raw model")
    io.add_argument("--sample-dir", default="samples", help="PNGs go to SAMPLE_DIR/<run name>/, the .npz and the "
                    "settings .json beside that folder")
    io.add_argument("--vae", default=None, help="decoder: ema | mse (stabilityai/sd-vae-ft-*), a local diffusers "
                    "folder, a hub id or random-tiny; default: our checkpoint's VAE, else ema (the paper's)")
    io.add_argument("--allow-download", action="store_true",
                    help="let a hub-id VAE download when it is not in the local Hugging Face cache")
    io.add_argument("--pixel-rounding", choices=PIXEL_ROUNDINGS, default="repa",
                    help="repa: clamp(255 * (x + 1) / 2) truncated to uint8, as REPA's generate.py and ADM write "
                         "samples (the paper's FIDs); dit: clamp(127.5 x + 128) truncated, as DiT's sample_ddp.py")
    add_repa_model_flags(parser, "model (not needed: every checkpoint names its architecture; flags given must "
                                 "agree with it, and fill what a REPA-style checkpoint's args lack)")
    sampler = parser.add_argument_group("sampler")
    sampler_flags = dict(typed=True, defaults=True)  # declared once with the in-training FID's (operations/config.py)
    add_flags(sampler, [SAMPLER_OPTIONS_BY_NAME[name] for name in ("mode", "num_steps")], **sampler_flags)
    sampler.add_argument("--heun", action="store_true", help="Heun instead of Euler (ODE only)")
    sampler.add_argument("--path-type", choices=PATH_TYPES, default=None,
                         help="interpolant; default: our checkpoint's training path, else linear")
    add_flags(sampler, [SAMPLER_OPTIONS_BY_NAME[name] for name in ("cfg_scale", "guidance_low", "guidance_high")],
              aliases={"guidance_low": ["--guidance_low"], "guidance_high": ["--guidance_high"]}, **sampler_flags)
    sampler.add_argument("--global-seed", type=number("[0, inf)"), default=0,
                         help="sample i is seeded by (global seed, i)")
    sampler.add_argument("--label-mode", choices=LABEL_MODES, default="random",
                         help="random: uniform per sample; balanced: label = i mod num_classes")
    run = parser.add_argument_group("run")
    run.add_argument("--num-fid-samples", type=number("[1, 4294967296)"), default=50_000,
                     help="samples in all (the paper's FIDs: 50K)")
    run.add_argument("--per-proc-batch-size", type=number("[1, inf)"), default=32, help="samples per batch on each "
                     "process")
    run.add_argument("--chunk-size", type=number("[0, inf)"), default=0,
                     help="at most this many rows per model and VAE call, 0 = the whole batch (for memory)")
    run.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                     help="auto: the GPU of this process (LOCAL_RANK) when there is one, else the CPU")
    add_flags(run, [SAMPLER_OPTIONS_BY_NAME[name] for name in ("precision", "bitwise")], **sampler_flags)
    run.add_argument("--compile", action="store_true", help="torch.compile the SiT (one compilation per batch shape)")
    return parser


def settings_path(folder: str) -> str:
    return folder + ".json"


def folder_name(settings: dict) -> str:
    """REPA-style descriptive name: the weights as training step and short hash, then the settings in the name (all
    of IDENTITY_KEYS are checked on resume, named or not)."""
    model = str(settings["model_args"]["model"]).replace("/", "-")
    step = "" if settings["checkpoint_step"] is None else f"step{settings['checkpoint_step']:07d}-"
    cfg = f"cfg-{settings['cfg_scale']}" + (f"-{settings['guidance_low']}-{settings['guidance_high']}"
                                            if settings["cfg_scale"] > 1 else "")
    return (f"{model}-{step}{settings['weights_sha256'][:8]}-{settings['weights']}-size-{settings['resolution']}-vae-"
            f"{os.path.basename(settings['vae'].rstrip('/'))}-{settings['mode']}{'-heun' if settings['heun'] else ''}-"
            f"{settings['num_steps']}-{cfg}-seed-{settings['global_seed']}"
            + ("" if settings["pixel_rounding"] == "repa" else f"-{settings['pixel_rounding']}-pixels"))


def finished_indices(folder: str) -> set:
    """Indices whose PNG exists (PNGs are written atomically, so an existing one is complete)."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return {int(m.group(1)) for m in map(re.compile(r"^(\d{6,})\.png$").match, names) if m}


def png_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"{index:06d}.png")


def save_png(image: np.ndarray, path: str) -> None:
    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


def read_png(path: str, shape) -> np.ndarray:
    try:
        with Image.open(path) as img:
            array = np.asarray(img)
    except (OSError, ValueError) as e:
        raise InvalidInput(f"cannot read sample {path}: {e}; delete it and rerun to make it again") from e
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or (shape and array.shape != shape):
        raise InvalidInput(f"sample {path} is {array.dtype} {array.shape}, expected uint8 {shape or '(H, W, 3)'}; "
                           "delete it and rerun to make it again")
    return array


def gather(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...]; [obj] without a process group."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sample(args: argparse.Namespace) -> str:
    """The whole run for this process, from sample_ddp.py's flags (checked by main); returns the .npz path."""
    # Processes: torchrun / accelerate launch set WORLD_SIZE, RANK and LOCAL_RANK.
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("--device cuda: no CUDA GPU is visible")
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    autocast_dtype = apply_precision(args.precision)

    # Model: every process loads the checkpoint itself, and all must have loaded the same weights.
    model_flags = {k: getattr(args, k) for k in ("model", "resolution", "num_classes", "encoder_depth", "qk_norm",
                                                 "projector_embed_dims")}
    model, info = load_model(args.ckpt, args.weights, model_flags)
    if info["model_args"].get("built_depth") is not None:
        raise InvalidInput(f"{args.ckpt} is a Phase-1 (warmup) checkpoint: it has no final layer and cannot "
                           "generate; sample from a Phase-2 checkpoint")
    weights = weights_sha256(model.state_dict(), show_progress=rank == 0)
    if len(set(gather(weights))) > 1:
        raise InvalidInput(f"the processes loaded different weights from {args.ckpt}: the file was replaced while "
                           "they read it, as last.pt is whenever training saves; sample a numbered checkpoint")
    model = model.to(device)
    if args.compile:
        model = torch.compile(model)
    vae_name = args.vae or info["config"].get("vae") or "ema"
    vae_name = f"stabilityai/sd-vae-ft-{vae_name}" if vae_name in ("ema", "mse") else vae_name
    with refusals("--vae"):
        vae = load_vae(vae_name, allow_download=args.allow_download).to(device)

    # Folder: named by the weights and settings, resumed only with the same ones, held by one run at a time.
    settings = {**vars(args), "ckpt": os.path.abspath(args.ckpt), "checkpoint_format": info["format"],
                "checkpoint_step": info["step"], "weights_sha256": weights, "model_args": info["model_args"],
                "path_type": args.path_type or info["config"].get("path_type") or "linear",
                "resolution": info["model_args"]["input_size"] * 8, "vae": vae_name, "world_size": world_size,
                "device": device.type, "torch_version": torch.__version__}
    folder = os.path.join(args.sample_dir, folder_name(settings))
    npz_path = folder + ".npz"
    lock, refusal = None, None
    if rank == 0:
        try:
            lock = RunLock(folder).acquire()
        except FolderInUse as error:
            refusal = str(error)
    refusal = gather(refusal)[0]
    if refusal:
        raise FolderInUse(refusal)
    if lock is not None and lock.taken_over:
        print(f"note: took over {lock.path} from a run that ended without releasing it (killed): {lock.taken_over}")
    try:
        if os.path.isfile(settings_path(folder)):
            with open(settings_path(folder)) as f:
                previous = json.load(f)
            current = json.loads(json.dumps(settings))  # the stored copy's JSON round trip (tuples -> lists)
            differ = [f"{k}: {previous.get(k)!r} before, {current[k]!r} now" for k in IDENTITY_KEYS
                      if previous.get(k) != current[k]]
            if differ:
                raise InvalidInput(f"{folder} was sampled with other weights or settings ({'; '.join(differ)}); use "
                                   "another --sample-dir or delete the folder")
        elif finished_indices(folder):
            raise InvalidInput(f"{folder} holds samples but not {settings_path(folder)}, their settings; move them "
                               "away or use another --sample-dir")
        barrier()  # everyone has read the old settings before rank 0 replaces them
        if rank == 0:
            print(f"Weights sha256 {weights} ({'no step' if info['step'] is None else 'step ' + str(info['step'])}) "
                  f"from {settings['ckpt']}")
            os.makedirs(folder, exist_ok=True)
            # Under the lock: a temp file now is a killed run's leftover. In the shared --sample-dir only this run's
            # own .npz and .json temps are ours.
            removed = remove_stale_temps(folder) + remove_stale_temps(
                args.sample_dir, targets=[os.path.basename(npz_path), os.path.basename(settings_path(folder))])
            if removed:
                print(f"removed {removed} temp file{'s' if removed != 1 else ''} an interrupted run left in {folder} "
                      "and beside it")
            atomic_write(settings_path(folder),
                         lambda f: f.write(json.dumps(settings, indent=2, sort_keys=True).encode()))
        finished = finished_indices(folder)
        barrier()  # no process writes before every process has listed the folder

        # Loop: every world_size-th missing index, written as a PNG as soon as it is made.
        todo = [i for i in range(args.num_fid_samples) if i not in finished][rank::world_size]
        if rank == 0:
            print(f"{len(finished & set(range(args.num_fid_samples)))} of {args.num_fid_samples} samples already in "
                  f"{folder}; {world_size} process(es) make the rest")
        labels = all_labels(args.global_seed, args.num_fid_samples, model.num_classes, args.label_mode)
        with bitwise_scope(args.bitwise, device):
            for indices, images in generate_images(
                    model, vae, todo, global_seed=args.global_seed, label_mode=args.label_mode, mode=args.mode,
                    num_steps=args.num_steps, heun=args.heun, path_type=settings["path_type"],
                    cfg_scale=args.cfg_scale, guidance_low=args.guidance_low, guidance_high=args.guidance_high,
                    autocast_dtype=autocast_dtype, batch_size=args.per_proc_batch_size,
                    chunk_size=1 if args.bitwise else args.chunk_size, pixel_rounding=args.pixel_rounding,
                    progress=rank == 0, desc=f"Sampling ({world_size} proc)"):
                for index, image in zip(indices, images):
                    save_png(image, png_path(folder, index))
        barrier()

        # .npz: rank 0 assembles it from the PNGs, in index order.
        if rank == 0:
            missing = sorted(set(range(args.num_fid_samples)) - finished_indices(folder))
            if missing:
                raise RuntimeError(f"{len(missing)} samples missing from {folder} after sampling (first: "
                                   f"{missing[:5]})")
            shape = read_png(png_path(folder, 0), None).shape
            images = (read_png(png_path(folder, i), shape) for i in range(args.num_fid_samples))
            write_images_npz(npz_path, images, args.num_fid_samples, shape, labels)
            print(f"Saved {npz_path}: arr_0 uint8 ({args.num_fid_samples}, {shape[0]}, {shape[1]}, 3), arr_1 labels; "
                  f"settings in {settings_path(folder)}")
        # The other ranks leave without waiting for the .npz: a long build would trip NCCL's barrier timeout.
        if dist.is_initialized():
            dist.destroy_process_group()
        return npz_path
    finally:
        if lock is not None:
            lock.release()


def main(argv=None) -> str:
    parser = build_parser()
    args = parser.parse_args(argv)  # each flag's type and range; what relates two flags, or a path, here:
    if not args.guidance_low <= args.guidance_high:
        parser.error(f"need --guidance-low <= --guidance-high, got {args.guidance_low} and {args.guidance_high}")
    check_folder_path(args.sample_dir, "--sample-dir")
    return sample(args)


if __name__ == "__main__":
    run_main(main)
