"""One command on one GPU: the GPU tests, then the benchmarks, within a time budget (8 minutes on one H100).

    python bench/gpu_suite.py                          # everything; writes bench/results/<gpu>-<date>.json
    python bench/gpu_suite.py --only tests             # just `pytest -m gpu tests/test_gpu.py`
    python bench/gpu_suite.py --only bench --skip evaluator-50k
    python bench/gpu_suite.py --only train-xl2-phase2-compile
    python bench/gpu_suite.py --dry-run                # the plan and FLOPs per image; needs no GPU

Parts run in the order of PARTS; one whose estimated time no longer fits --budget-s is skipped and says so (the
tests get the budget the benchmarks after them leave, and skip the tests that would overrun it). Everything uses
random weights of the real architectures, offline: SiT-B/2 and SiT-XL/2, the DINOv2-B/14 teacher
(`random-dinov2-vit-b`), SD-VAE (`random-sd-vae`), the evaluator's Inception network.

Training benchmarks time the real loop: train.main / train_warmup.main on the generated 256-px demo data with the
paper configs (SiT-B/2: table 4; SiT-XL/2: tables 1-2), teacher included, per-GPU batch 32, bf16, logging every
LOG_EVERY steps. images/s is the loop's own `images_per_sec`, averaged over the log windows after the first (which
holds warm-up and compilation); `synced_images_per_sec` cross-checks it with the wall clock between two
torch.cuda.synchronize() calls over the same steps. MFU = images/s x FLOPs per image / peak: FLOPs from
bench/flops.py (formula in its docstring and in the JSON), peak from the GPU name or --peak-tflops.
"""
import argparse
import datetime
import functools
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

from bench import flops  # noqa: E402

BUDGET_S = 480
RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")
CONFIGS = {"SiT-B/2": os.path.join(REPO_ROOT, "configs", "table4_sit_b2_erw.yaml"),
           "SiT-XL/2": os.path.join(REPO_ROOT, "configs", "table1_2_sit_xl2_erw.yaml")}
TEACHER = "random-dinov2-vit-b"
TEACHER_WIDTH = 768
RESOLUTION, BATCH, PRECISION = 256, 32, "bf16"
DEMO_IMAGES_PER_CLASS = 16          # 10 classes -> 160 images, 5 batches of 32 per epoch
LOG_EVERY, TRAIN_STEPS = 10, 40     # windows: 1-10 warm-up/compile, then 3 timed windows
BIG = 10 ** 6                       # "never" for checkpoint / sample-grid intervals
SAMPLER = dict(model="SiT-XL/2", num_steps=250, batch_size=32, mode="sde", cases=("no-cfg", "cfg-interval"))
EVALUATOR = dict(n_samples=50_000, n_ref=10_000, image_size=256, batch_size=64)
# One in-training FID as --fid-num-samples 10000 --fid-num-steps 50 runs it, timed on 512 of the samples (a full one
# would take ~7 of the suite's 8 minutes on one GPU) and extrapolated, for 1 and for 8 GPUs. Estimated ~60 s: ~25 s
# of sampling at the sampler part's rate, the rest the two 2048 x 2048 sqrtm of FID and sFID on the CPU.
FID = dict(model="SiT-XL/2", num_samples=512, extrapolate_to=10_000, gpus_for_estimate=8, num_steps=50, mode="sde",
           precision="bf16", batch_size=BATCH)
OPTIONAL_PACKAGES = {"timm": "teacher", "diffusers": "VAE", "accelerate": "trainer", "triton": "--compile on GPUs",
                     "scipy": "FID", "flash_attn": "not needed: attention goes through torch SDPA"}
GPU_TESTS = os.path.join("tests", "test_gpu.py")


def make_demo_data(dest: str) -> str:
    """The generated demo dataset at 256 px (preprocessing/dataset_tools.py make-demo; the VAE on the GPU)."""
    from preprocessing import dataset_tools
    dataset_tools.main(["make-demo", "--dest", dest, "--resolution", str(RESOLUTION),
                        "--images-per-class", str(DEMO_IMAGES_PER_CLASS), "--vae", "random-tiny"])
    return dest


def num_workers() -> int:
    return max(2, min(8, (os.cpu_count() or 4) // 2))


#################################################################################
#                                     FLOPs                                     #
#################################################################################

def _meta_sit(model: str, phase: int, with_teacher: bool = True, warmup_depth: int = 5, encoder_depth: int = 8):
    from models.sit import create_sit
    with torch.device("meta"):  # the architecture without allocating it
        if phase == 1:
            return create_sit(model, input_size=RESOLUTION // 8, z_dims=[TEACHER_WIDTH], encoder_depth=warmup_depth,
                              truncated=True)
        return create_sit(model, input_size=RESOLUTION // 8, z_dims=[TEACHER_WIDTH] if with_teacher else [],
                          encoder_depth=encoder_depth)


@functools.lru_cache(maxsize=None)
def teacher_flops() -> int:
    import timm
    from models.encoders import DINOV2_MODELS, teacher_input_size
    with torch.device("meta"):
        vit = timm.create_model(DINOV2_MODELS["b"][0], pretrained=False, num_classes=0,
                                img_size=teacher_input_size(RESOLUTION))
    return flops.vit_forward_flops(vit)["total"]


def flop_table() -> Dict[str, Dict[str, float]]:
    """FLOPs per image of everything the benchmarks time (see bench/flops.py)."""
    teacher = teacher_flops()
    table = {"DINOv2-B/14 teacher forward (224 px)": {"forward": teacher, "per_image": teacher}}
    for model, phase, k in (("SiT-B/2", 2, None), ("SiT-XL/2", 2, None), ("SiT-XL/2", 1, 5)):
        fwd = flops.sit_forward_flops(_meta_sit(model, phase, warmup_depth=k or 5))["total"]
        name = f"{model} Phase {phase}" + (f" (k={k})" if k else "") + " training step, teacher included"
        table[name] = {"forward": fwd, "per_image": flops.training_step_flops(fwd, teacher)}
    row = flops.sit_forward_flops(_meta_sit("SiT-XL/2", 2, with_teacher=False), with_projectors=False)["total"]
    table["SiT-XL/2 sampling forward, per model row"] = {"forward": row, "per_image": row}
    table["Inception-v3 (evaluator) forward"] = {"forward": flops.inception_forward_flops(),
                                                 "per_image": flops.inception_forward_flops()}
    return table


#################################################################################
#                                     Parts                                     #
#################################################################################

@dataclass
class Context:
    args: argparse.Namespace
    work: str
    deadline: float
    peak: Dict[str, Optional[float]] = field(default_factory=dict)
    data: Optional[str] = None
    later_estimate_s: float = 0.0   # estimated seconds of the selected parts after the running one
    device: str = "cuda"


@dataclass
class Part:
    name: str
    group: str                      # "setup", "tests" or "bench"
    estimate_s: float               # on one H100, not measured yet where it says so in the plan
    what: str
    settings: Dict[str, Any]
    run: Callable[[Context, "Part"], Dict[str, Any]]
    optional: bool = False          # last, and only if the budget has room: no time is reserved for it


def _free_gpu():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _scratch(ctx: Context, gigabytes: float) -> str:
    """A folder for a run's checkpoints (the loop always saves at its last step): RAM-backed /dev/shm when it has
    room, so the benchmark does not wait for a disk, else the work folder."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and shutil.disk_usage(shm).free > 2 * gigabytes * 2 ** 30:
        return tempfile.mkdtemp(prefix="erw-gpu-suite-", dir=shm)
    return tempfile.mkdtemp(prefix="run-", dir=ctx.work)


def run_data(ctx: Context, part: Part) -> Dict[str, Any]:
    ctx.data = make_demo_data(os.path.join(ctx.work, "demo-256"))
    return {"data_dir": ctx.data}


def run_tests(ctx: Context, part: Part) -> Dict[str, Any]:
    """pytest -m gpu in a subprocess (a crash there cannot take the benchmarks with it), its output live on the
    console; the tests that would overrun the time left to them (the later parts' estimates kept free) skip."""
    deadline = ctx.deadline - ctx.later_estimate_s
    junit = os.path.join(ctx.work, "gpu-tests.xml")
    env = {**os.environ, "ERW_GPU_DEADLINE": str(deadline), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    if ctx.data:
        env["ERW_GPU_DATA"] = ctx.data
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rfEs",
               f"--junitxml={junit}", GPU_TESTS]
    try:  # a test that runs far past its estimate is stopped two minutes after the deadline
        returncode = subprocess.run(command, cwd=REPO_ROOT, env=env,
                                    timeout=max(60.0, deadline - time.time() + 120)).returncode
    except subprocess.TimeoutExpired:
        returncode = "timeout"
    tests = _junit_results(junit)
    counts = {}
    for t in tests:
        counts[t["status"].split(":")[0]] = counts.get(t["status"].split(":")[0], 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in counts.items()) or f"pytest exit {returncode}"
    result = {"command": " ".join(command[1:]), "returncode": returncode, "summary": summary, "tests": tests}
    if returncode not in (0, 5):  # 5: no test selected
        raise PartFailed(f"pytest: {summary} (exit {returncode})", result)
    return result


def _junit_results(path: str) -> List[Dict[str, Any]]:
    """[{test, status, seconds, message}] from pytest's JUnit XML (absent when pytest was killed)."""
    if not os.path.isfile(path):
        return []
    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        entry = {"test": case.get("name"), "status": "passed", "seconds": round(float(case.get("time", 0)), 1)}
        for child in case:
            if child.tag in ("failure", "error"):
                entry.update(status="failed", message=(child.get("message") or "")[:1000])
            elif child.tag == "skipped":
                entry.update(status="skipped: " + (child.get("message") or "")[:200])
        tests.append(entry)
    return tests


class PartFailed(RuntimeError):
    def __init__(self, message: str, result: Dict[str, Any]):
        super().__init__(message)
        self.result = result


def _training_argv(ctx: Context, settings: Dict[str, Any], out: str, name: str) -> List[str]:
    argv = ["--config", CONFIGS[settings["model"]], "--data-dir", ctx.data, "--output-dir", out, "--exp-name", name,
            "--resolution", str(RESOLUTION), "--enc-type", TEACHER, "--batch-size", str(BATCH),
            "--mixed-precision", PRECISION, "--num-workers", str(num_workers()), "--report-to", "none",
            "--max-train-steps", str(TRAIN_STEPS), "--log-every", str(LOG_EVERY),
            "--checkpointing-steps", str(BIG), "--compile" if settings["compile"] else "--no-compile"]
    if settings["phase"] == 2:
        argv += ["--warmup-ckpt", "none", "--encoder-depth", str(settings["encoder_depth"]),
                 "--vae", os.path.join(ctx.data, "vae"), "--sampling-steps", str(BIG),
                 "--sample-grid-size", "4", "--sample-num-steps", "2"]
    return argv


def run_training(ctx: Context, part: Part) -> Dict[str, Any]:
    """The real training loop for TRAIN_STEPS steps; throughput of the log windows after the first."""
    import train
    import train_warmup
    from bench.loop_probe import ObjectiveProbe, probing
    s = part.settings
    entry = train_warmup if s["phase"] == 1 else train
    # Checkpoint size: model + EMA + two AdamW moments, float32.
    params = sum(p.numel() for p in _meta_sit(s["model"], s["phase"], warmup_depth=s.get("warmup_depth", 5),
                                               encoder_depth=s.get("encoder_depth", 8)).parameters())
    out = _scratch(ctx, params * 16 / 2 ** 30)
    probe = ObjectiveProbe(start=LOG_EVERY, stop=TRAIN_STEPS - 1)  # from the start of step 11 to that of step 40
    try:
        with probing(entry, probe):
            result = entry.main(_training_argv(ctx, s, out, part.name))
        history = result["history"]
        del result
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if s["compile"]:
            torch._dynamo.reset()
        _free_gpu()
    windows = [round(r["images_per_sec"], 2) for r in history]
    timed = windows[1:]
    images_per_sec = statistics.mean(timed)
    synced = BATCH * probe.steps / probe.seconds if probe.seconds else None
    per_image = flops.training_step_flops(
        flops.sit_forward_flops(_meta_sit(s["model"], s["phase"], warmup_depth=s.get("warmup_depth", 5),
                                          encoder_depth=s.get("encoder_depth", 8)))["total"], teacher_flops())
    return {"measured_with": "real training loop (train.main / train_warmup.main), teacher included",
            "images_per_sec": round(images_per_sec, 2), "step_s": round(BATCH / images_per_sec, 4),
            "images_per_sec_by_window": windows, "first_window_excluded": "warm-up / compilation",
            "synced_images_per_sec": round(synced, 2) if synced else None,
            "synced_window": f"steps {probe.start + 1}..{probe.stop} (torch.cuda.synchronize() at both ends)",
            "flops_per_image": per_image, **_throughput(ctx, images_per_sec, per_image, "bf16"),
            "final_loss": history[-1].get("loss")}


def _throughput(ctx: Context, images_per_sec: float, per_image: float, precision: str) -> Dict[str, Any]:
    tflops = images_per_sec * per_image / 1e12
    peak = ctx.peak.get(precision)
    return {"achieved_tflops": round(tflops, 1), "peak_tflops": peak, "peak_precision": precision,
            "mfu": round(flops.mfu(images_per_sec, per_image, peak), 4) if peak else None}


def run_sampler(ctx: Context, part: Part) -> Dict[str, Any]:
    """bench/bench_sampler.py's cases on SiT-XL/2 (latent sampler, no VAE decode), bf16 autocast."""
    from bench.bench_sampler import CFG_CASES, run_case
    from erw.generation import precision_scope
    from models.sit import create_sit
    s = part.settings
    device = torch.device(ctx.device)
    try:
        with precision_scope("bf16") as autocast_dtype:
            with device:  # random init on the GPU: the weights do not change the speed
                model = create_sit(s["model"], input_size=RESOLUTION // 8, num_classes=1000, z_dims=[])
            model = model.eval().requires_grad_(False)
            row = flops.sit_forward_flops(model, with_projectors=False)["total"]
            args = argparse.Namespace(input_size=RESOLUTION // 8, mode=s["mode"], heun=False,
                                      num_steps=s["num_steps"], batch_size=s["batch_size"], batches=1,
                                      micro_batch_size=0, noise_source="per-sample")
            cases = {}
            for case in CFG_CASES:
                if case[0] in s["cases"]:
                    with torch.no_grad():
                        r = run_case(model, device, args, case, autocast_dtype)
                    per_sample = r["model_rows_per_sample"] * row
                    cases[case[0]] = {**r, "images_per_sec": round(r["samples_per_s"], 2),
                                      "flops_per_image": per_sample,
                                      **_throughput(ctx, r["samples_per_s"], per_sample, "bf16")}
    finally:
        _free_gpu()
    return {"measured_with": "bench/bench_sampler.py run_case", "flops_per_model_row": row, "cases": cases}


def run_evaluator(ctx: Context, part: Part) -> Dict[str, Any]:
    """bench/bench_evaluator.py's end-to-end mode: evaluate() on synthetic .npz files (random Inception weights)."""
    from bench.bench_evaluator import bench_end_to_end
    s = part.settings
    workdir = tempfile.mkdtemp(prefix="evaluator-", dir=ctx.work)
    try:
        r = bench_end_to_end(s["n_samples"], s["n_ref"], s["image_size"], s["batch_size"], torch.device(ctx.device),
                             workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        _free_gpu()
    stages = r["stages_s"]
    network_s = stages.get("reference_activations", 0) + stages.get("sample_activations", 0)
    images = s["n_samples"] + s["n_ref"]
    per_image = flops.inception_forward_flops()
    return {**r, "measured_with": "bench/bench_evaluator.py bench_end_to_end",
            "images_per_sec": round(images / network_s, 1) if network_s else None,
            "images_per_sec_means": "Inception activations of samples + reference, per second of those two stages",
            "end_to_end_samples_per_sec": round(s["n_samples"] / r["evaluate_s"], 1), "flops_per_image": per_image,
            **(_throughput(ctx, images / network_s, per_image, "fp32") if network_s else {})}


def run_fid(ctx: Context, part: Part) -> Dict[str, Any]:
    """One in-training FID (evaluations/training_fid.py FidHook.measure: generation, SD-VAE decode, Inception, FID,
    sFID, IS) of SiT-XL/2, random weights, on a subset of the samples; a full 10K-sample FID costs the subset's
    per-sample time x 10K (/ the GPU count) plus the fixed metric time, which is what this part reports."""
    from types import SimpleNamespace

    import numpy as np
    from evaluations.inception import POOL_DIM, SPATIAL_DIM
    from evaluations.training_fid import FidHook
    from models.sit import create_sit
    s = part.settings
    device = torch.device(ctx.device)
    workdir = tempfile.mkdtemp(prefix="fid-", dir=ctx.work)
    try:
        # Reference statistics in the file, as ADM's VIRTUAL_imagenet256_labeled.npz holds them: no reference pass.
        ref = os.path.join(workdir, "ref.npz")
        np.savez(ref, np.zeros((4, RESOLUTION, RESOLUTION, 3), np.uint8), mu=np.zeros(POOL_DIM),
                 sigma=np.eye(POOL_DIM), mu_s=np.zeros(SPATIAL_DIM), sigma_s=np.eye(SPATIAL_DIM))
        config = {"fid_ref": ref, "fid_every": 1, "max_train_steps": 1, "fid_num_samples": s["num_samples"],
                  "fid_num_steps": s["num_steps"], "fid_mode": s["mode"], "fid_precision": s["precision"], "seed": 0,
                  "path_type": "linear", "cfg_scale": 1.0, "guidance_low": 0.0, "guidance_high": 1.0,
                  "inception_weights": "random", "vae": "random-sd-vae"}
        trainer = SimpleNamespace(accelerator=SimpleNamespace(process_index=0, num_processes=1, is_main_process=True),
                                  device=device, local_batch_size=s["batch_size"], log=print)
        hook = FidHook(config, trainer)
        with device:  # random init on the GPU: the weights do not change the speed
            model = create_sit(s["model"], input_size=RESOLUTION // 8, num_classes=1000, z_dims=[])
        model = model.eval().requires_grad_(False)
        row = flops.sit_forward_flops(model, with_projectors=False)["total"]
        r = hook.measure(model, desc="FID benchmark")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        _free_gpu()
    per_sample_s = r["fid_sample_seconds"] / s["num_samples"]
    metrics_s = r["fid_seconds"] - r["fid_sample_seconds"]
    n, gpus = s["extrapolate_to"], s["gpus_for_estimate"]
    per_image = s["num_steps"] * row  # SiT forwards only (no CFG); the VAE and the Inception are not counted
    return {"measured_with": "evaluations/training_fid.py FidHook.measure", "samples_timed": s["num_samples"],
            "sample_seconds": r["fid_sample_seconds"], "metrics_seconds": round(metrics_s, 2),
            "images_per_sec": round(1 / per_sample_s, 2), "flops_per_image": per_image,
            "flops_per_image_means": f"{s['num_steps']} {s['model']} forwards (VAE decode and Inception not counted)",
            f"estimate_{n // 1000}k_1gpu_s": round(n * per_sample_s + metrics_s, 1),
            f"estimate_{n // 1000}k_{gpus}gpu_s": round(n / gpus * per_sample_s + metrics_s, 1),
            **_throughput(ctx, 1 / per_sample_s, per_image, s["precision"])}


def _train_part(name, model, phase, compile_, estimate_s, optional=False, **extra):
    settings = {"model": model, "phase": phase, "compile": compile_, "config": os.path.relpath(CONFIGS[model],
                REPO_ROOT), "teacher": TEACHER, "batch_size": BATCH, "precision": PRECISION, "steps": TRAIN_STEPS,
                "log_every": LOG_EVERY, "resolution": RESOLUTION, **extra}
    what = (f"{model} Phase {phase}" + (f" (k={extra['warmup_depth']})" if "warmup_depth" in extra else "") +
            (" --compile" if compile_ else " eager") + ": real training loop")
    return Part(name, "bench", estimate_s, what, settings, run_training, optional)


# Estimates are for one H100, not yet measured: the suite prints the real times next to them.
PARTS = [
    Part("data", "setup", 10, f"make-demo at {RESOLUTION} px, {10 * DEMO_IMAGES_PER_CLASS} images",
         {"resolution": RESOLUTION, "images": 10 * DEMO_IMAGES_PER_CLASS}, run_data),
    Part("tests", "tests", 300, "pytest -m gpu tests/test_gpu.py (SiT-B/2 Phase 1 -> 2 -> resume, bf16/fp16 x "
         "eager/compile, host syncs, sample_ddp, evaluator GPU vs CPU)", {"file": GPU_TESTS}, run_tests),
    _train_part("train-b2-phase2", "SiT-B/2", 2, False, 12, encoder_depth=8),
    # The tests compiled this graph (bf16, batch 32): inductor's on-disk cache makes this compilation short.
    _train_part("train-b2-phase2-compile", "SiT-B/2", 2, True, 20, encoder_depth=8),
    _train_part("train-xl2-phase2", "SiT-XL/2", 2, False, 25, encoder_depth=18),
    _train_part("train-xl2-phase1", "SiT-XL/2", 1, False, 10, warmup_depth=5),
    Part("sampler-xl2", "bench", 25, f"SiT-XL/2 sampling, {SAMPLER['num_steps']} SDE steps, batch "
         f"{SAMPLER['batch_size']}, bf16, without and with the CFG interval (1.8 on t <= 0.7)", SAMPLER, run_sampler),
    Part("evaluator-50k", "bench", 75, f"ADM evaluator end to end: {EVALUATOR['n_samples']} samples + "
         f"{EVALUATOR['n_ref']} reference images, Inception batch {EVALUATOR['batch_size']}", EVALUATOR,
         run_evaluator),
    # Last and optional: the others fill the 8 minutes; these run when they leave room, or alone with --only.
    Part("fid-xl2-10k", "bench", 60, f"in-training FID of SiT-XL/2 ({FID['num_steps']} SDE steps, {FID['precision']}, "
         f"SD-VAE, Inception) timed on {FID['num_samples']} samples, extrapolated to {FID['extrapolate_to']:,}",
         FID, run_fid, optional=True),
    _train_part("train-xl2-phase2-compile", "SiT-XL/2", 2, True, 70, optional=True, encoder_depth=18),
]


def select_parts(only: Optional[List[str]], skip: List[str]) -> List[Part]:
    names = {p.name for p in PARTS}
    groups = {p.group for p in PARTS}
    for name in (only or []) + skip:
        if name not in names | groups:
            raise SystemExit(f"error: unknown part '{name}'; parts: {', '.join(p.name for p in PARTS)}; groups: "
                             f"{', '.join(sorted(groups))}")
    chosen = [p for p in PARTS if only is None or p.name in only or p.group in only]
    chosen = [p for p in chosen if p.name not in skip and p.group not in skip]
    # Tests and training benchmarks read the demo data.
    if any(p.group == "tests" or p.run is run_training for p in chosen) and "data" not in {p.name for p in chosen}:
        chosen.insert(0, PARTS[0])
    return chosen


#################################################################################
#                                Report and main                                #
#################################################################################

def package_versions() -> Dict[str, Optional[str]]:
    versions = {}
    for name in ["torch", "numpy"] + list(OPTIONAL_PACKAGES):
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def markdown_table(report: Dict[str, Any]) -> str:
    lines = ["| part | status | time s (est.) | images/s | GFLOP/image | TFLOP/s | MFU | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for p in report["parts"]:
        rows = [(p["name"], p.get("result", {}))]
        if "cases" in p.get("result", {}):
            rows = [(f"{p['name']} {case}", r) for case, r in p["result"]["cases"].items()]
        for name, r in rows:
            mfu_text = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
            note = p.get("reason", "")
            if p["name"] == "tests":
                note = r.get("summary", note)
            elif "synced_images_per_sec" in r:
                note = f"synced {r['synced_images_per_sec']} img/s; windows {r['images_per_sec_by_window']}"
            elif "model_rows_per_sample" in r:
                note = f"{r['model_rows_per_sample']:.0f} model rows per sample"
            elif "evaluate_s" in r:
                note = f"evaluate() {r['evaluate_s']} s end to end ({r['end_to_end_samples_per_sec']} samples/s)"
            elif "samples_timed" in r:
                note = "; ".join(f"{k[len('estimate_'):-2].replace('_', ' on ')}: {v} s" for k, v in r.items()
                                 if k.startswith("estimate_")) + f" (metrics {r['metrics_seconds']} s)"
            gflop = f"{r['flops_per_image'] / 1e9:.1f}" if r.get("flops_per_image") else "-"
            lines.append(f"| {name} | {p['status']} | {p.get('elapsed_s', '-')} ({p['estimate_s']:.0f}) | "
                         f"{r.get('images_per_sec', '-')} | {gflop} | {r.get('achieved_tflops', '-')} | {mfu_text} | "
                         f"{note} |")
    return "\n".join(lines)


def derived(report: Dict[str, Any]) -> Dict[str, Any]:
    """Ratios between parts: the Phase-1 step time over the Phase-2 step time (SiT-XL/2, real loop, teacher in)."""
    ok = {p["name"]: p["result"] for p in report["parts"] if p["status"] == "ok"}
    out = {}
    if "train-xl2-phase1" in ok and "train-xl2-phase2" in ok:
        out["xl2_phase1_over_phase2_step_time"] = round(
            ok["train-xl2-phase2"]["images_per_sec"] / ok["train-xl2-phase1"]["images_per_sec"], 3)
    return out


def print_plan(parts: List[Part], budget: float) -> None:
    print(f"Plan (budget {budget:.0f} s; estimates for one H100, to be replaced by measured times):")
    total = 0.0
    for p in parts:
        total += p.estimate_s
        fits = "" if total <= budget else "  <- past the budget: skipped unless time is left"
        settings = ", ".join(f"{k}={v}" for k, v in p.settings.items())
        print(f"  {p.name:26s} ~{p.estimate_s:4.0f} s  (cumulative {total:4.0f} s){fits}\n      {p.what}\n"
              f"      {settings}")
        if p.group == "tests":
            # Only a dry run imports the test module here (its conftest sets torch's thread count for the process).
            from tests import test_gpu
            print("      in this order; a test that would end past the tests' share of the budget is skipped:")
            for name, estimate, what in test_gpu.plan():
                print(f"        {name:48s} ~{estimate:3.0f} s  {what}")
    optional = [p.name for p in parts if p.optional]
    if optional:
        print(f"  {', '.join(optional)}: optional, runs only if the others leave room (or alone with --only NAME)")
    print("\nFLOPs per image (multiply-add = 2 FLOPs; training step = 3 x SiT forward + teacher forward; "
          "bench/flops.py):")
    for name, row in flop_table().items():
        print(f"  {name:62s} {row['per_image'] / 1e9:9.1f} GFLOP  (forward {row['forward'] / 1e9:.1f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="PART", default=None,
                        help="run only these parts or groups (setup, tests, bench); 'data' is added when needed. "
                             f"Parts: {', '.join(p.name for p in PARTS)}")
    parser.add_argument("--skip", nargs="+", metavar="PART", default=[], help="leave out these parts or groups")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-clock budget of the whole suite")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of this GPU in TFLOP/s for MFU (default: from the GPU name: H100 SXM "
                             "989, H100 PCIe 756, H200 989, A100 312)")
    parser.add_argument("--peak-tflops-fp32", type=float, default=None,
                        help="plain fp32 peak for the evaluator's MFU (default: from the GPU name)")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a new temp folder, removed)")
    parser.add_argument("--output", default=None, help="JSON path (default: bench/results/<gpu>-<date>.json)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and FLOPs per image; no GPU needed")
    args = parser.parse_args(argv)
    parts = select_parts(args.only, args.skip)
    if args.dry_run:
        print_plan(parts, args.budget_s)
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here; `--dry-run` shows the plan, `pytest -q tests` runs the CPU tests")
    start = time.time()
    work = args.work_dir or tempfile.mkdtemp(prefix="erw-gpu-suite-")
    os.makedirs(work, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    peak = flops.peak_tflops(gpu)
    peak_source = {"bf16": "table (bench/flops.py)" if peak["bf16"] else "unknown GPU: pass --peak-tflops",
                   "fp32": "table (bench/flops.py)" if peak["fp32"] else "unknown GPU: pass --peak-tflops-fp32"}
    for key, override in (("bf16", args.peak_tflops), ("fp32", args.peak_tflops_fp32)):
        if override:
            peak[key], peak_source[key] = override, "--peak-tflops" + ("-fp32" if key == "fp32" else "")
    ctx = Context(args, work, start + args.budget_s, peak)
    versions = package_versions()
    missing = [f"{name} ({why})" for name, why in OPTIONAL_PACKAGES.items() if versions.get(name) is None]
    print(f"GPU: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}; peak bf16 {peak['bf16']} / fp32 "
          f"{peak['fp32']} TFLOP/s ({peak_source['bf16']}); missing optional packages: {', '.join(missing) or 'none'}")
    report = {
        "date": datetime.date.today().isoformat(), "gpu": gpu, "gpu_count": torch.cuda.device_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(), "packages": versions, "missing_optional_packages": missing,
        "peak_tflops": {**peak, "source": peak_source}, "budget_s": args.budget_s,
        "flop_formula": flops.__doc__, "flops_per_image": {k: v["per_image"] for k, v in flop_table().items()},
        "parts": [],
    }
    for i, part in enumerate(parts):
        ctx.later_estimate_s = sum(p.estimate_s for p in parts[i + 1:] if not p.optional)
        entry = {"name": part.name, "group": part.group, "what": part.what, "settings": part.settings,
                 "estimate_s": part.estimate_s}
        left = ctx.deadline - time.time()
        if part.estimate_s > left and not (args.only and part.name in args.only):
            entry.update(status="skipped", reason=f"~{part.estimate_s:.0f} s estimated, {max(left, 0):.0f} s of "
                                                  f"the budget left (raise --budget-s or run --only {part.name})")
        else:
            t0 = time.time()
            print(f"\n=== {part.name}: {part.what} (~{part.estimate_s:.0f} s estimated)", flush=True)
            try:
                entry.update(status="ok", result=part.run(ctx, part))
            except Exception as e:  # one failed part must not cost the others' results
                entry.update(status="failed", error=f"{type(e).__name__}: {e}",
                             traceback=traceback.format_exc()[-4000:])
                if isinstance(e, PartFailed):
                    entry["result"] = e.result
            entry["elapsed_s"] = round(time.time() - t0, 1)
        print(f"=== {part.name}: {entry['status']} after {entry.get('elapsed_s', 0)} s (total "
              f"{time.time() - start:.0f} s) {entry.get('reason', entry.get('error', ''))}", flush=True)
        report["parts"].append(entry)
    report["derived"] = derived(report)
    report["elapsed_s"] = round(time.time() - start, 1)
    path = args.output or os.path.join(RESULTS_DIR, f"{gpu_slug(gpu)}-{report['date']}.json")
    if args.output is None and os.path.exists(path):  # a second run the same day keeps the first
        path = path[:-len(".json")] + datetime.datetime.now().strftime("-%H%M%S") + ".json"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + markdown_table(report))
    tests = next((p for p in report["parts"] if p["name"] == "tests" and "result" in p), None)
    if tests:
        print("\n| GPU test | status | s | failure |\n|---|---|---|---|")
        for t in tests["result"]["tests"]:
            failure = t.get("message", "").splitlines()[0][:200] if t.get("message") else ""
            print(f"| {t['test']} | {t['status']} | {t['seconds']} | {failure} |")
    for key, value in report["derived"].items():
        print(f"{key}: {value}")
    print(f"\nMFU = images/s x FLOPs per image / peak ({peak['bf16']} TFLOP/s bf16, {peak_source['bf16']}; evaluator: "
          f"{peak['fp32']} TFLOP/s fp32). FLOPs per image (multiply-add = 2): a training step = 3 x the SiT forward "
          "+ the teacher forward; sampling = model rows x the SiT forward; formulas in bench/flops.py and the JSON. "
          f"Missing optional packages: {', '.join(missing) or 'none'}.")
    print(f"Total {report['elapsed_s']} s of {args.budget_s:.0f}. Results: {path}")
    return 0 if all(p["status"] != "failed" for p in report["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
