"""Sampler throughput: samples/s and model evaluations per sample, without CFG, with CFG on all steps, and with a
CFG interval; prints one JSON object per case. Times the latent sampler only (per-sample seeding as sample_ddp.py
does it, no VAE decode), with random-init weights (speed does not depend on them).

    python -m bench.bench_sampler --models SiT-Tiny/2 SiT-B/2 --num-steps 250 --batch-size 8
    python -m bench.bench_sampler --models SiT-XL/2 --precision bf16 --batch-size 128 --num-steps 250   # GPU

`velocity_calls_per_sample` counts sampler calls of the velocity function; `model_rows_per_sample` counts SiT
forward rows (a call inside the CFG interval costs two rows). `--noise-source batch` draws the SDE's noise from one
generator for the batch instead of one per sample, to measure what per-sample reproducibility costs.
"""
import argparse
import json
import sys
import time

if not __package__:  # started as a path: the repository root, where erw/ lives, is not importable
    sys.exit("error: run from the repository root as `python -m bench.bench_sampler ...`")

import torch  # noqa: E402

from erw.generation import sample_inputs  # noqa: E402
from erw.precision import apply_precision  # noqa: E402
from erw.samplers import GuidedVelocity, model_evaluations_per_sample, sample_batch  # noqa: E402
from erw.transport import get_path  # noqa: E402
from models.sit import create_sit  # noqa: E402

# (name, cfg_scale, guidance_low, guidance_high): REPA's best ImageNet setting is 1.8 on t in [0, 0.7].
CFG_CASES = [("no-cfg", 1.0, 0.0, 1.0), ("cfg-all-steps", 1.8, 0.0, 1.0), ("cfg-interval", 1.8, 0.0, 0.7)]


class RowCounter(torch.nn.Module):
    """Forwards to the SiT and counts the rows it is called on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes, self.rows = model, model.num_classes, 0

    def forward(self, x, t, y, return_projections=True):
        self.rows += x.shape[0]
        return self.model(x, t, y, return_projections=return_projections)


def run_case(model, device, args, cfg, autocast_dtype):
    name, cfg_scale, low, high = cfg
    counter = RowCounter(model)
    velocity_fn = GuidedVelocity(counter, cfg_scale, low, high, autocast_dtype, args.micro_batch_size)
    latent_shape = (model.in_channels, args.input_size, args.input_size)
    path = get_path("linear")

    def one_batch(first_index, num_steps):
        indices = list(range(first_index, first_index + args.batch_size))
        noise, labels, generators = sample_inputs(0, indices, latent_shape, model.num_classes, "random")
        noise_source = generators if args.noise_source == "per-sample" else torch.Generator().manual_seed(0)
        sample_batch(args.mode, velocity_fn, noise.to(device), labels.to(device), num_steps, path,
                     heun=args.heun, noise_source=noise_source)

    one_batch(0, min(args.num_steps, 3))  # warm-up: kernels, allocator, autotuning, compilation
    counter.rows = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in range(args.batches):
        one_batch((b + 1) * args.batch_size, args.num_steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    num_samples = args.batches * args.batch_size
    return {
        "case": name, "cfg_scale": cfg_scale, "guidance_interval": [low, high], "mode": args.mode,
        "heun": args.heun, "num_steps": args.num_steps, "batch_size": args.batch_size, "samples": num_samples,
        "seconds": round(seconds, 3), "samples_per_s": round(num_samples / seconds, 4),
        "velocity_calls_per_sample": model_evaluations_per_sample(args.mode, args.num_steps, args.heun),
        "model_rows_per_sample": counter.rows / num_samples,
        "noise_source": args.noise_source, "micro_batch_size": args.micro_batch_size,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["SiT-Tiny/2", "SiT-B/2"])
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256x256 images)")
    parser.add_argument("--mode", choices=["sde", "ode"], default="sde")
    parser.add_argument("--heun", action="store_true")
    parser.add_argument("--num-steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=1, help="timed batches per case (after one warm-up)")
    parser.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="tf32")
    parser.add_argument("--micro-batch-size", type=int, default=0, help="0 = whole batch per model call")
    parser.add_argument("--noise-source", choices=["per-sample", "batch"], default="per-sample")
    parser.add_argument("--compile", action="store_true", help="torch.compile the SiT (as sample_ddp.py --compile)")
    parser.add_argument("--cases", nargs="+", default=[c[0] for c in CFG_CASES],
                        choices=[c[0] for c in CFG_CASES])
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast_dtype = apply_precision(args.precision)
    torch.manual_seed(0)
    for model_name in args.models:
        # No projector heads: sampling skips them anyway.
        model = create_sit(model_name, input_size=args.input_size, num_classes=1000, z_dims=[])
        model = model.to(device).eval().requires_grad_(False)
        if args.compile:
            model = torch.compile(model)
        for cfg in CFG_CASES:
            if cfg[0] not in args.cases:
                continue
            with torch.no_grad():
                result = run_case(model, device, args, cfg, autocast_dtype)
            result.update(model=model_name, input_size=args.input_size, precision=args.precision, compile=args.compile,
                          device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                          threads=torch.get_num_threads())
            print(json.dumps(result), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
