"""ERW end to end on the demo data (10 classes of coloured shapes, 64 px), offline, on a CPU, in a few minutes: the
data, Phase 1, Phase 2, sampling, class accuracy and FD-demo of the samples, CKNNA by layer, all under exps/demo.
The numbers are the demo's own, not the paper's (FD-demo is not ImageNet FID). Each stage, its outputs, and the
demo's small VAE, teacher and classifier: docs/demo.md.

    python demo.py            # resumes whatever an earlier run left; finished stages are not redone
    python demo.py --fresh    # deletes exps/demo first
    python demo.py --table    # the paper's Table 2 in miniature: SiT vs REPA vs ERW, at equal total steps and at
                              # equal Phase-2 steps
"""
import json
import os
import shutil
import time

import numpy as np

from operations.cli import ArgumentParser, InvalidInput, run_main
from operations.files import atomic_write

ROOT = os.path.dirname(os.path.abspath(__file__))
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")


def build_parser():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.path.join("exps", "demo"), help="output folder")
    parser.add_argument("--data-dir", default=os.path.join("data", "demo"),
                        help="demo data folder (configs/tiny.yaml's data_dir)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    parser.add_argument("--images-per-class", type=int, default=32, help="demo dataset size per class (10 classes)")
    parser.add_argument("--phase1-steps", type=int, default=150, help="Phase-1 optimizer steps")
    parser.add_argument("--phase2-steps", type=int, default=1500, help="Phase-2 optimizer steps")
    parser.add_argument("--num-samples", type=int, default=200, help="samples for the metrics (balanced classes)")
    parser.add_argument("--sample-steps", type=int, default=50, help="Euler-Maruyama steps (the paper uses 250)")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale (1 = none)")
    parser.add_argument("--cknna-layers", default=None, help="comma-separated layers (default: all)")
    parser.add_argument("--adm-metrics", action="store_true",
                        help="also run the ADM suite (FID, IS, ...) with a RANDOM Inception: plumbing only")
    parser.add_argument("--table", action="store_true", help="run the SiT / REPA / ERW comparison instead")
    parser.add_argument("--table-steps", type=int, default=2000,
                        help="--table: steps of SiT, REPA and ERW's Phase 2; ERW's warmup adds 1 / --table-evals of it")
    parser.add_argument("--table-evals", type=int, default=4, help="--table: evaluations along each run")
    return parser


def stage(title):
    print(f"\n=== {title} ===", flush=True)


def make_data(data_dir: str, images_per_class: int) -> str:
    """The demo dataset and its reference batch (both resume: finished files are kept). Returns the .npz path."""
    from preprocessing import dataset_tools
    dataset_tools.main(["make-demo", "--dest", data_dir, "--images-per-class", str(images_per_class)])
    reference = os.path.join(data_dir, "reference.npz")
    if not os.path.isfile(reference):
        dataset_tools.main(["reference", "--data-dir", data_dir, "--out", reference])
    return reference


def run_phase(entry_point, args, exp_dir):
    """Run a training entry point, resuming it when an earlier demo run left a checkpoint."""
    from operations.checkpoint import LAST_CHECKPOINT, numbered_checkpoints
    ckpt_dir = os.path.join(exp_dir, "checkpoints")
    if os.path.isfile(os.path.join(ckpt_dir, LAST_CHECKPOINT)) or numbered_checkpoints(ckpt_dir):
        args = [*args, "--resume"]
    entry_point.main(args)
    return os.path.join(ckpt_dir, LAST_CHECKPOINT)


def cached_json(path: str, key: dict, compute):
    """compute() once per key: the result is stored in `path` with the key and reused while the key matches."""
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        if stored.get("key") == key:
            return stored["result"]
    result = compute()
    atomic_write(path, lambda f: f.write(json.dumps({"key": key, "result": result}, indent=1).encode()))
    return result


def evaluate_checkpoint(ckpt: str, reference_npz: str, sample_dir: str, args, path: str) -> dict:
    """Balanced-label samples from `ckpt`'s EMA weights (sample_ddp.py) and their class accuracy and FD-demo, once
    per (EMA weights, sampler settings): the result is kept in `path`, so a rerun neither samples nor measures
    again."""
    from models.weights import weights_sha256
    from operations.checkpoint import load_checkpoint
    key = {"weights_sha256": weights_sha256(load_checkpoint(ckpt)["ema"]), "num_samples": args.num_samples,
           "sample_steps": args.sample_steps, "cfg_scale": args.cfg_scale}

    def compute():
        import sample_ddp
        from evaluations.demo_metrics import demo_metrics
        sample_npz = sample_ddp.main([
            "--ckpt", ckpt, "--sample-dir", sample_dir, "--num-fid-samples", str(args.num_samples), "--num-steps",
            str(args.sample_steps), "--cfg-scale", str(args.cfg_scale), "--label-mode", "balanced",
            "--per-proc-batch-size", "100", "--device", "cpu", "--precision", "fp32"])
        with np.load(reference_npz) as ref, np.load(sample_npz) as samples:
            return {**demo_metrics(ref["arr_0"], samples["arr_0"], samples["arr_1"]), "samples": sample_npz}
    return cached_json(path, key, compute)


def write_class_grid(reference_npz: str, sample_npz: str, path: str, per_class: int = 4) -> None:
    """One row per class: `per_class` real images, then the first `per_class` samples generated for that class."""
    from PIL import Image
    with np.load(reference_npz) as ref, np.load(sample_npz) as samples:
        rows = []
        for c in range(int(ref["arr_1"].max()) + 1):
            blank = np.zeros_like(ref["arr_0"][0])
            real = list(ref["arr_0"][ref["arr_1"] == c][:per_class])
            generated = list(samples["arr_0"][samples["arr_1"] == c][:per_class])
            row = real + [blank] * (per_class - len(real)) + [blank[:, :8]] + generated + \
                [blank] * (per_class - len(generated))
            rows.append(np.concatenate(row, axis=1))
    grid = np.concatenate(rows, axis=0)
    atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))


def read_metrics(exp_dir: str):
    """Logged records of a run (its metrics.jsonl), the last record per step."""
    from operations.run import METRICS_FILE
    with open(os.path.join(exp_dir, METRICS_FILE)) as f:
        records = {record["step"]: record for record in map(json.loads, f)}
    return [records[s] for s in sorted(records)]


def _figure(columns: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(5 * columns, 4))
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, columns)


def _save(figure, path: str) -> None:
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))


def losses_figure(phase1, phase2):
    """Phase 1's NT-Xent, Phase 2's losses (which one carries lambda said in the legend) and lambda(s)."""
    figure, axes = _figure(3)
    axes[0].plot([r["step"] for r in phase1], [r["align_loss"] for r in phase1], label="NT-Xent (weight 1)")
    axes[0].set(title="Phase 1: alignment on clean latents", xlabel="Phase-1 step", ylabel="loss")
    steps2 = [r["step"] for r in phase2]
    axes[1].plot(steps2, [r["velocity_loss"] for r in phase2], label="velocity loss (weight 1)")
    axes[1].plot(steps2, [r["align_loss"] for r in phase2], label="alignment loss (unweighted)")
    axes[1].plot(steps2, [r["loss"] for r in phase2], label="total = velocity + lambda(s) x alignment")
    axes[1].set(title="Phase 2: losses", xlabel="Phase-2 step", ylabel="loss")
    # The record at step s holds lambda(s - 1), the weight of the update that produced it.
    axes[2].plot([s - 1 for s in steps2], [r["lambda_used"] for r in phase2], label="lambda(s), the alignment weight")
    axes[2].set(title="Phase 2: lambda(s) = proj_coeff x 2^(-s / half-life)", xlabel="s (completed Phase-2 steps)",
                ylabel="lambda")
    for axis in axes:
        axis.legend()
        axis.grid(alpha=0.3)
    return figure


TABLE_METHODS = ("SiT", "REPA", "ERW")


def training_flops_per_step(exp_dir: str) -> float:
    """FLOPs of one optimizer step of the run in exp_dir (its checkpoint's model_args and config): the batch times a
    training image's FLOPs, 3 x the SiT forward (the backward costs about two forwards; projectors included when it
    has any) plus the teachers' forward, each forward counted by torch's FlopCounterMode on the meta device (a
    multiply-add is 2 FLOPs). A Phase-1 run's truncated SiT makes its steps cheaper."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from operations.checkpoint import LAST_CHECKPOINT, load_checkpoint
    from models.encoders import load_teachers
    from models.sit import create_sit
    ckpt = load_checkpoint(os.path.join(exp_dir, "checkpoints", LAST_CHECKPOINT))
    config, model_args = ckpt["config"], ckpt["model_args"]
    teachers = [t.to("meta") for t in load_teachers(config["enc_type"], config["resolution"], config["enc_weights"])] \
        if config["enc_type"] else []
    latent, side = model_args["input_size"], config["resolution"]
    with torch.device("meta"):
        model = create_sit(**model_args)
        with FlopCounterMode(display=False) as sit:
            model(torch.zeros(1, model.in_channels, latent, latent), torch.zeros(1), torch.zeros(1, dtype=torch.long))
        with FlopCounterMode(display=False) as teacher:
            for t in teachers:
                t(torch.zeros(1, 3, side, side, dtype=torch.uint8))
    return float((3 * sit.get_total_flops() + teacher.get_total_flops()) * config["batch_size"])


def table_rows(curves: dict, convention: str) -> list:
    """The markdown table, a row per method at the table's budget, in one of two conventions: "total" compares at
    equal optimizer steps with ERW's warmup counted; "phase2" at equal Phase-2 (generator) steps, as the paper's
    Table 2 puts "100K warmup + 100K" beside REPA at 100K. SiT and REPA have no warmup: the same row in both."""
    budget = max(p["total_steps"] for p in curves["SiT"])
    rows = ["| method | optimizer steps | FD-demo (lower is better) | class accuracy | compute (TFLOP) |",
            "|---|---|---|---|---|"]
    for method in TABLE_METHODS:
        point = next(p for p in curves[method] if p[f"{convention}_steps"] == budget)
        steps = f"{point['warmup_steps']} + {point['phase2_steps']}" if point["warmup_steps"] else \
            f"{point['phase2_steps']}"
        rows.append(f"| {method} | {steps} | {point['fd_demo']:.2f} | {point['class_accuracy']:.1%} | "
                    f"{point['tflop']:.2f} |")
    return rows


def run_table(args, start: float) -> dict:
    """SiT vs REPA vs ERW on the demo data with the same seeds, evaluated every --table-steps / --table-evals steps;
    ERW's Phase 2 runs the whole budget, which gives both conventions of table_rows. Writes table.md, table.json and
    table.png (docs/demo.md)."""
    import train
    import train_warmup
    from operations.checkpoint import numbered_checkpoints
    if args.table_steps % (2 * args.table_evals):
        raise InvalidInput(f"--table-steps {args.table_steps} must be a multiple of 2 x --table-evals "
                           f"({2 * args.table_evals}): evaluations and ERW's warmup fall on whole steps")
    every = args.table_steps // args.table_evals
    warmup = every  # ERW's Phase 1 spans the first evaluation interval (no generator exists yet there)
    out = os.path.join(args.out, "table")
    reference = make_data(args.data_dir, args.images_per_class)
    common = ["--config", TINY_CONFIG, "--data-dir", args.data_dir, "--output-dir", out,
              "--max-train-steps", str(args.table_steps)]
    stage(f"table: ERW Phase 1, {warmup} steps")
    warmup_dir = os.path.join(out, "ERW-warmup")
    warmup_ckpt = run_phase(train_warmup, [*common, "--exp-name", "ERW-warmup", "--max-train-steps", str(warmup)],
                            warmup_dir)
    warmup_tflop = warmup * training_flops_per_step(warmup_dir) / 1e12
    phase2 = {
        "SiT": ["--enc-type", "none", "--warmup-ckpt", "none"],
        "REPA": ["--warmup-ckpt", "none", "--align-loss", "cosine", "--proj-decay", "none"],
        # ERW's lambda half-life: half its Phase 2, the paper's proportion (50K of 100K)
        "ERW": ["--warmup-ckpt", warmup_ckpt, "--proj-half-life", str(args.table_steps / 2)],
    }
    curves = {}
    for method in TABLE_METHODS:
        stage(f"table: {method}, {args.table_steps} Phase-2 steps")
        exp_dir = os.path.join(out, method)
        run_phase(train, [*common, "--exp-name", method, "--checkpointing-steps", str(every), *phase2[method]],
                  exp_dir)
        warmup_steps, before = (warmup, warmup_tflop) if method == "ERW" else (0, 0.0)
        step_tflop = training_flops_per_step(exp_dir) / 1e12
        curves[method] = []
        for step, ckpt in numbered_checkpoints(os.path.join(exp_dir, "checkpoints")):
            metrics = evaluate_checkpoint(ckpt, reference, os.path.join(out, "samples"), args,
                                          os.path.join(exp_dir, f"demo_metrics-{step:07d}.json"))
            curves[method].append({"warmup_steps": warmup_steps, "phase2_steps": step,
                                   "total_steps": warmup_steps + step, "tflop": before + step * step_tflop,
                                   **metrics})
    table = "\n".join([f"At equal optimizer steps ({args.table_steps}, ERW's warmup counted):", "",
                       *table_rows(curves, "total"), "",
                       f"At equal Phase-2 steps ({args.table_steps}, the paper's Table 2: warmup on top):", "",
                       *table_rows(curves, "phase2")])
    atomic_write(os.path.join(out, "table.md"), lambda f: f.write((table + "\n").encode()))
    atomic_write(os.path.join(out, "table.json"), lambda f: f.write(json.dumps(curves, indent=1).encode()))
    _save(table_figure(curves), os.path.join(out, "table.png"))
    minutes = (time.perf_counter() - start) / 60
    print(f"\n=== SiT vs REPA vs ERW on the demo data ({minutes:.1f} min) ===\n{table}\n"
          f"  curves: {os.path.join(out, 'table.png')}, {os.path.join(out, 'table.json')}")
    return {"curves": curves, "table": table, "minutes": minutes}


def table_figure(curves: dict):
    """FD-demo and class accuracy against the optimizer step (ERW's warmup steps included), one line per method."""
    figure, axes = _figure(2)
    for method, points in curves.items():
        steps = [p["total_steps"] for p in points]
        axes[0].plot(steps, [p["fd_demo"] for p in points], marker="o", label=method)
        axes[1].plot(steps, [100 * p["class_accuracy"] for p in points], marker="o", label=method)
    axes[0].set(title="FD-demo (demo classifier features; lower is better)", ylabel="FD-demo")
    axes[1].set(title="class accuracy of samples (chance 10%)", ylabel="accuracy (%)")
    for axis in axes:
        axis.set_xlabel("optimizer steps (ERW: warmup included)")
        axis.legend()
        axis.grid(alpha=0.3)
    return figure


def main(argv=None):
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    if args.fresh and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    if args.table:
        return run_table(args, start)
    out = args.out
    os.makedirs(out, exist_ok=True)
    print("ERW demo: the VAE, teacher and classifier are small networks trained on the demo images "
          "(assets/demo); the numbers are the demo's own, not the paper's.")

    stage("1/5 demo dataset and reference batch")
    reference = make_data(args.data_dir, args.images_per_class)

    import train
    import train_warmup
    common = ["--config", TINY_CONFIG, "--data-dir", args.data_dir, "--output-dir", out]
    stage("2/5 Phase 1: align blocks 0..k-1 with the demo teacher on clean latents")
    phase1_dir = os.path.join(out, "phase1")
    phase1_ckpt = run_phase(train_warmup, [*common, "--exp-name", "phase1", "--max-train-steps",
                                           str(args.phase1_steps)], phase1_dir)

    stage("3/5 Phase 2: full model, velocity + decaying alignment, warm-started")
    phase2_dir = os.path.join(out, "phase2")
    phase2_ckpt = run_phase(train, [*common, "--exp-name", "phase2", "--warmup-ckpt", phase1_ckpt,
                                    "--max-train-steps", str(args.phase2_steps)], phase2_dir)

    stage("4/5 sampling (sample_ddp.py: Euler-Maruyama, EMA weights, classifier-free guidance), then class "
          "accuracy and FD-demo (demo classifier)")
    metrics = evaluate_checkpoint(phase2_ckpt, reference, os.path.join(out, "samples"), args,
                                  os.path.join(out, "demo_metrics.json"))
    sample_npz = metrics["samples"]
    print(f"class accuracy {metrics['class_accuracy']:.1%} (chance 10%), FD-demo {metrics['fd_demo']:.2f}")
    samples_png = os.path.join(out, "samples_by_class.png")
    write_class_grid(reference, sample_npz, samples_png)
    if args.adm_metrics:
        from evaluations.evaluator import evaluate
        adm = cached_json(os.path.join(out, "adm_metrics.json"), {"samples": sample_npz}, lambda: evaluate(
            reference, sample_npz, inception_weights="random", device="cpu", batch_size=32,
            is_split_size=min(args.num_samples, 100), cache_dir=os.path.join(out, "cache")))
        print(f"ADM suite with a RANDOM Inception (plumbing only): FID {adm['fid']:.2f}")

    stage("5/5 CKNNA by layer: Phase 1 vs Phase 2")
    from evaluations import cknna
    cknna_json = os.path.join(out, "cknna.json")
    if not (os.path.isfile(cknna_json) and os.path.getmtime(cknna_json) > os.path.getmtime(phase2_ckpt)):
        layers = ["--layers", args.cknna_layers] if args.cknna_layers else []
        cknna.main(["--ckpt", phase1_ckpt, phase2_ckpt, "--labels", "phase1", "phase2", "--data-dir", args.data_dir,
                    "--output-dir", out, "--device", "cpu", "--num-workers", "0", *layers])

    loss_png = os.path.join(out, "losses.png")
    _save(losses_figure(read_metrics(phase1_dir), read_metrics(phase2_dir)), loss_png)
    grids = sorted(os.listdir(os.path.join(phase2_dir, "samples")))
    minutes = (time.perf_counter() - start) / 60
    print(f"\n=== ERW demo done in {minutes:.1f} min ===")
    print(f"  class accuracy {metrics['class_accuracy']:.1%} of {metrics['num_samples']} samples (chance 10%); "
          f"FD-demo {metrics['fd_demo']:.2f} (demo classifier features; not ImageNet FID)")
    print(f"  checkpoints   {phase1_ckpt}\n                {phase2_ckpt}")
    print(f"  sample grids  {os.path.join(phase2_dir, 'samples', grids[0])} (start of Phase 2), "
          f"{os.path.join(phase2_dir, 'samples', grids[-1])} (end)")
    print(f"  samples       {sample_npz}\n                {samples_png} (one row per class: 4 real images, then 4 "
          "samples)")
    print(f"  loss curves   {loss_png}")
    print(f"  CKNNA         {cknna_json}, {os.path.join(out, 'cknna.png')}")
    return {"metrics": metrics, "minutes": minutes}


if __name__ == "__main__":
    run_main(main)
