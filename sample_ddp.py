"""Generate samples from a SiT checkpoint for FID: a folder of PNGs and one .npz (arr_0 uint8 (N, H, W, 3),
arr_1 labels) that the ADM evaluator reads.

    torchrun --nproc_per_node 8 sample_ddp.py --ckpt exps/NAME/checkpoints/0400000.pt --cfg-scale 1.8 \\
        --guidance-high 0.7
    accelerate launch sample_ddp.py --ckpt ...          # same thing
    python sample_ddp.py --ckpt ...                      # one process

Sample i depends only on (--global-seed, i) and the sampler settings, not on the number of processes or the batch
size; rerunning an interrupted command skips the finished PNGs. Pixels are written as REPA writes them
(--pixel-rounding, recorded in the settings .json; a folder is never resumed with the other convention). The
generation loop (erw/generation.py) is the one train.py's in-training FID runs. REPA's checkpoints and the ERW
release's load too: the model comes from the flags they pickled (`args`), and model flags given must agree with them
(erw/checkpoint.py, repa_model_args).

A sample folder belongs to the weights that made it, not to the --ckpt path (SAMPLE_DIR/SiT-XL-2-step0400000-
3f2a9c1b-ema-size-256-...; the rule and what it implies: erw/sample_run.py, IDENTITY_KEYS). While training is still
saving, sample a numbered checkpoint.
"""
import argparse

from erw.cli import ArgumentParser, run_main
from erw.checkpoint import WEIGHTS, add_repa_model_flags
from erw.config import SAMPLER_OPTIONS_BY_NAME, add_flags
from erw.generation import LABEL_MODES
from erw.sample_run import DEVICES, run_sampling
from erw.transport import PATH_TYPES
from models.vae import PIXEL_ROUNDINGS


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    io = parser.add_argument_group("checkpoint and output")
    io.add_argument("--ckpt", required=True, help="our checkpoint (has model_args) or a REPA checkpoint")
    io.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA weights (default) or the raw model")
    io.add_argument("--sample-dir", default="samples",
                    help="PNGs go to SAMPLE_DIR/<run name>/, the .npz and the settings .json beside that folder")
    io.add_argument("--vae", default=None,
                    help="decoder: ema | mse (stabilityai/sd-vae-ft-*), a local diffusers folder, a hub id or "
                         "random-tiny; default: the VAE in our checkpoint's config, else ema (as the paper)")
    io.add_argument("--allow-download", action="store_true",
                    help="let a hub-id VAE download when it is not in the local Hugging Face cache")
    io.add_argument("--pixel-rounding", choices=PIXEL_ROUNDINGS, default="repa",
                    help="repa: clamp(255 * (x + 1) / 2) truncated to uint8, as REPA's generate.py and ADM write "
                         "samples (the pixels the paper's FIDs are computed on); dit: clamp(127.5 x + 128) "
                         "truncated, i.e. rounded, as DiT's sample_ddp.py (one level higher on ~half the pixels)")

    add_repa_model_flags(parser, "model (not needed: every checkpoint names its architecture; flags given must "
                                 "agree with it, and fill what a REPA-style checkpoint's args lack)")

    sampler = parser.add_argument_group("sampler")
    sampler_flags = dict(typed=True, defaults=True)  # declared once with the in-training FID's: erw/config.py
    add_flags(sampler, [SAMPLER_OPTIONS_BY_NAME[name] for name in ("mode", "num_steps")], **sampler_flags)
    sampler.add_argument("--heun", action="store_true", help="Heun instead of Euler (ODE only)")
    sampler.add_argument("--path-type", choices=PATH_TYPES, default=None,
                         help="interpolant; default: our checkpoint's training path, else linear")
    add_flags(sampler, [SAMPLER_OPTIONS_BY_NAME[name] for name in ("cfg_scale", "guidance_low", "guidance_high")],
              aliases={"guidance_low": ["--guidance_low"], "guidance_high": ["--guidance_high"]}, **sampler_flags)
    sampler.add_argument("--global-seed", type=int, default=0, help="sample i is seeded by (global seed, i)")
    sampler.add_argument("--label-mode", choices=LABEL_MODES, default="random",
                         help="random: uniform per sample; balanced: label = i mod num_classes")

    run = parser.add_argument_group("run")
    run.add_argument("--num-fid-samples", type=int, default=50_000, help="samples in all (the paper's FIDs: 50K)")
    run.add_argument("--per-proc-batch-size", type=int, default=32, help="samples per batch on each process")
    run.add_argument("--device", choices=DEVICES, default="auto",
                     help="auto: the GPU of this process (LOCAL_RANK) when there is one, else the CPU")
    add_flags(run, [SAMPLER_OPTIONS_BY_NAME["precision"]], **sampler_flags)
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the SiT (about 1.7x faster on GPUs after one compilation per batch shape)")
    run.add_argument("--micro-batch-size", type=int, default=None,
                     help="rows per model/VAE call, 0 = the whole batch; default 1 on the CPU (with sampling on one "
                          "CPU thread: bitwise independent of batch size and process count) and 0 on GPUs")
    return parser


def main(argv=None) -> str:
    return run_sampling(vars(build_parser().parse_args(argv)))


if __name__ == "__main__":
    run_main(main)
