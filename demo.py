"""The whole ERW pipeline on an embedded default, offline, on a CPU, in minutes:

    generated demo dataset (10 classes of coloured shapes, 64 px, random tiny VAE)
    -> Phase 1 (train_warmup.py)  -> Phase 2 (train.py, warm-started from Phase 1)
    -> sample_ddp.py (Euler-Maruyama) -> ADM metrics (evaluations/evaluator.py) -> CKNNA by layer

    python demo.py            # resumes whatever an earlier run left in exps/demo
    python demo.py --fresh    # deletes exps/demo first

The teacher, the VAE and the Inception network have RANDOM weights (nothing is downloaded): the mechanics are
real, the numbers are not comparable to the paper's. Everything lands in exps/demo/.
"""
import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("exps", "demo"), help="output folder")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    parser.add_argument("--images-per-class", type=int, default=32, help="demo dataset size per class (10 classes)")
    parser.add_argument("--phase1-steps", type=int, default=150)
    parser.add_argument("--phase2-steps", type=int, default=400)
    parser.add_argument("--num-samples", type=int, default=320, help="samples for the metrics")
    parser.add_argument("--sample-steps", type=int, default=50, help="Euler-Maruyama steps (the paper uses 250)")
    parser.add_argument("--cknna-layers", default=None, help="comma-separated layers (default: all)")
    return parser.parse_args(argv)


def stage(title):
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def run_phase(entry_point, args, exp_dir):
    """Run a training entry point, resuming it when an earlier demo run left a checkpoint."""
    from erw.trainer import LAST_CHECKPOINT, numbered_checkpoints
    ckpt_dir = os.path.join(exp_dir, "checkpoints")
    if os.path.isfile(os.path.join(ckpt_dir, LAST_CHECKPOINT)) or numbered_checkpoints(ckpt_dir):
        args = [*args, "--resume"]
    entry_point.main(args)


def reference_batch(data_dir: str, path: str) -> str:
    """The demo dataset's images as an ADM reference batch (arr_0: uint8 N x H x W x 3)."""
    if not os.path.isfile(path):
        from erw.data import ImageLatentDataset
        dataset = ImageLatentDataset(data_dir)
        images = np.stack([dataset[i][0].permute(1, 2, 0).numpy() for i in range(len(dataset))])
        np.savez(path, arr_0=images)
    return path


def read_metrics(exp_dir: str):
    """Logged records of a run (erw/trainer.py metrics.jsonl), the last record per step."""
    from erw.trainer import METRICS_FILE
    records = {}
    with open(os.path.join(exp_dir, METRICS_FILE)) as f:
        for line in f:
            record = json.loads(line)
            records[record["step"]] = record
    return [records[s] for s in sorted(records)]


def plot_losses(phase1, phase2, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in phase1], [r["align_loss"] for r in phase1])
    axes[0].set(title="Phase 1: NT-Xent alignment (clean latents)", xlabel="step", ylabel="loss")
    steps2 = [r["step"] for r in phase2]
    axes[1].plot(steps2, [r["velocity_loss"] for r in phase2], label="velocity")
    axes[1].plot(steps2, [r["align_loss"] for r in phase2], label="alignment")
    axes[1].set(title="Phase 2: losses", xlabel="step")
    axes[1].legend()
    # The record at step s holds lambda(s - 1), the weight of the update that produced it.
    axes[2].plot([s - 1 for s in steps2], [r["lambda_used"] for r in phase2])
    axes[2].set(title="Phase 2: lambda(s) = proj_coeff * 2^(-s / half-life)", xlabel="s (completed steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    out = args.out
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.join(out, "data")
    vae_dir = os.path.join(data_dir, "vae")
    print("ERW demo: the teacher, the VAE and the Inception network have RANDOM weights; the pipeline is real, "
          "the numbers are not the paper's.")

    from preprocessing import dataset_tools
    stage("1/6 demo dataset")
    dataset_tools.main(["make-demo", "--dest", data_dir, "--images-per-class", str(args.images_per_class)])

    import train
    import train_warmup
    common = ["--config", TINY_CONFIG, "--data-dir", data_dir, "--output-dir", out]
    stage("2/6 Phase 1: warm up blocks 0..k-1 against the teacher")
    phase1_dir = os.path.join(out, "phase1")
    run_phase(train_warmup, [*common, "--exp-name", "phase1", "--max-train-steps", str(args.phase1_steps),
                             "--checkpointing-steps", str(args.phase1_steps)], phase1_dir)
    phase1_ckpt = os.path.join(phase1_dir, "checkpoints", "last.pt")

    stage("3/6 Phase 2: full model, velocity + decaying alignment, warm-started")
    phase2_dir = os.path.join(out, "phase2")
    run_phase(train, [*common, "--exp-name", "phase2", "--warmup-ckpt", phase1_ckpt, "--vae", vae_dir,
                      "--max-train-steps", str(args.phase2_steps), "--checkpointing-steps", str(args.phase2_steps),
                      "--sampling-steps", str(args.phase2_steps)], phase2_dir)
    phase2_ckpt = os.path.join(phase2_dir, "checkpoints", "last.pt")

    stage("4/6 sampling (sample_ddp.py, Euler-Maruyama SDE, EMA weights)")
    import sample_ddp
    sample_npz = sample_ddp.main(["--ckpt", phase2_ckpt, "--vae", vae_dir, "--sample-dir", os.path.join(out, "samples"),
                                  "--num-fid-samples", str(args.num_samples), "--num-steps", str(args.sample_steps),
                                  "--per-proc-batch-size", "64", "--label-mode", "balanced", "--device", "cpu",
                                  "--precision", "fp32"])

    stage("5/6 ADM metrics (RANDOM Inception weights: meaningless numbers)")
    from evaluations.evaluator import evaluate
    ref_npz = reference_batch(data_dir, os.path.join(out, "reference.npz"))
    metrics = evaluate(ref_npz, sample_npz, inception_weights="random", device="cpu", batch_size=32,
                       is_split_size=min(args.num_samples, 100), cache_dir=os.path.join(out, "cache"))
    metrics_path = os.path.join(out, "metrics.json")
    with open(metrics_path, "w") as f:
        json.dump(metrics, f, indent=1)

    stage("6/6 CKNNA by layer: Phase 1 vs Phase 2")
    from evaluations import cknna
    layers = ["--layers", args.cknna_layers] if args.cknna_layers else []
    cknna.main(["--ckpt", phase1_ckpt, phase2_ckpt, "--labels", "phase1", "phase2", "--data-dir", data_dir,
                "--output-dir", out, "--device", "cpu", "--num-workers", "0", *layers])

    loss_png = os.path.join(out, "losses.png")
    plot_losses(read_metrics(phase1_dir), read_metrics(phase2_dir), loss_png)
    grids = sorted(os.listdir(os.path.join(phase2_dir, "samples")))
    minutes = (time.perf_counter() - start) / 60
    print(f"\n=== ERW demo done in {minutes:.1f} min ===")
    print(f"  checkpoints   {phase1_ckpt}\n                {phase2_ckpt}")
    print(f"  sample grids  {os.path.join(phase2_dir, 'samples', grids[0])} (start of Phase 2), "
          f"{os.path.join(phase2_dir, 'samples', grids[-1])} (end)")
    print(f"  loss curves   {loss_png}")
    print(f"  samples       {sample_npz}")
    print(f"  metrics       {metrics_path}: FID {metrics['fid']:.2f}, IS {metrics['inception_score']:.2f} "
          f"(random Inception: meaningless)")
    print(f"  CKNNA         {os.path.join(out, 'cknna.json')}, {os.path.join(out, 'cknna.png')}")
    return {"metrics": metrics, "minutes": minutes}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
