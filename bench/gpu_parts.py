"""The parts of bench/gpu_suite.py: what each runs and measures, at full size on one GPU or at toy size on the CPU
(`--rehearse`). A part is a function (Context, Part) -> JSON-able dict; the suite runs each in a process of its own
(bench/part_runner.py). Everything uses random weights of the real architectures, offline: SiT-B/2 and SiT-XL/2,
the DINOv2-B/14 teacher (`random-dinov2-vit-b`), SD-VAE (`random-sd-vae`), the evaluator's Inception network.

Training parts time the real loop: train.main / train_warmup.main on the generated demo data with the paper configs
(SiT-B/2: table 4; SiT-XL/2: tables 1-2), teacher included, per-GPU batch 32, bf16, logging every `log_every` steps.
images/s is the loop's own `images_per_sec`, averaged over the log windows after the first (which holds warm-up and
compilation); `synced_images_per_sec` cross-checks it with the wall clock between two torch.cuda.synchronize()
calls over the same steps. MFU = images/s x FLOPs per image / peak: FLOPs from bench/flops.py (formula in its
docstring and in the results), peak from the GPU name or --peak-tflops.

The rehearsal runs the same functions with toy sizes (SCALES["rehearsal"]): SiT-Tiny/2 for both SiT sizes, the
random tiny teacher, 64 px, a few steps and samples, on the CPU; torch.compile uses dynamo's eager backend there
(graph capture runs, inductor's code generation, minutes on a CPU, does not). It checks that every part runs end to
end, not what it measures.
"""
import dataclasses
import gc
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Dict, List, Optional

import torch

from bench import flops

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"B": os.path.join(REPO_ROOT, "configs", "table4_sit_b2_erw.yaml"),
           "XL": os.path.join(REPO_ROOT, "configs", "table1_2_sit_xl2_erw.yaml")}
PRECISION = "bf16"
BIG = 10 ** 6                       # "never" for checkpoint / sample-grid intervals
GPU_TESTS = os.path.join("tests", "test_gpu.py")
JUNIT_NAME = "gpu-tests.xml"
REPORT_LOG_NAME = "gpu-tests.jsonl"
PROFILE_NAME = "profile-xl2-phase2.md"
SHM = "/dev/shm"
# What the suite imports before it forks its parts (bench/part_runner.py), so that no part pays for them again
# ("module:attribute" also loads what the attribute loads lazily: diffusers' models).
PRELOAD = ("timm", "diffusers.models:AutoencoderKL", "accelerate", "scipy.linalg", "pytest", "train", "train_warmup",
           "sample_ddp",
           "evaluations.evaluator", "evaluations.training_fid", "bench.bench_sampler", "bench.bench_evaluator",
           "bench.loop_probe", "preprocessing.dataset_tools")
OPTIONAL_PACKAGES = {"timm": "teacher", "diffusers": "VAE", "accelerate": "trainer", "triton": "--compile on GPUs",
                     "scipy": "FID", "pytest": "GPU tests", "flash_attn": "not needed: attention goes through SDPA"}


@dataclass(frozen=True)
class Scale:
    """Every size a part uses: FULL on a GPU, REHEARSAL on the CPU."""
    device: str
    resolution: int
    batch: int
    teacher: str
    teacher_width: int
    models: Dict[str, str]              # "B" / "XL" -> SiT registry name
    encoder_depth: Dict[str, int]       # Phase-2 projector block per size
    warmup_depth: int                   # Phase-1 blocks (k)
    train_steps: int
    log_every: int                      # the first log window (warm-up, compilation) is not timed
    images_per_class: int               # demo data: 10 classes
    num_workers: int
    sampler: Dict[str, Any]
    evaluator: Dict[str, Any]
    fid: Dict[str, Any]
    profile: Dict[str, int]             # steps run, and the micro-batches [start, stop) profiled
    compile_backend: Optional[str]      # None: torch.compile's default (inductor)


FULL = Scale(device="cuda", resolution=256, batch=32, teacher="random-dinov2-vit-b", teacher_width=768,
             models={"B": "SiT-B/2", "XL": "SiT-XL/2"}, encoder_depth={"B": 8, "XL": 18}, warmup_depth=5,
             train_steps=40, log_every=10, images_per_class=16, num_workers=max(2, min(8, (os.cpu_count() or 4) // 2)),
             sampler=dict(num_steps=250, batch_size=32, mode="sde"),
             evaluator=dict(n_samples=50_000, n_ref=10_000, image_size=256, batch_size=64, is_split_size=5000),
             # Timed on 512 samples and extrapolated to 10K (a full one would take most of the suite's minutes).
             fid=dict(num_samples=512, extrapolate_to=10_000, gpus_for_estimate=8, num_steps=50, batch_size=32),
             profile=dict(steps=12, start=6, stop=10), compile_backend=None)
REHEARSAL = Scale(device="cpu", resolution=64, batch=4, teacher="random-vit-tiny", teacher_width=64,
                  models={"B": "SiT-Tiny/2", "XL": "SiT-Tiny/2"}, encoder_depth={"B": 2, "XL": 3}, warmup_depth=2,
                  train_steps=4, log_every=2, images_per_class=2, num_workers=0,
                  sampler=dict(num_steps=3, batch_size=2, mode="sde"),
                  evaluator=dict(n_samples=6, n_ref=8, image_size=64, batch_size=4, is_split_size=3),
                  fid=dict(num_samples=4, extrapolate_to=10_000, gpus_for_estimate=8, num_steps=2, batch_size=2),
                  profile=dict(steps=4, start=1, stop=3), compile_backend="eager")
REHEARSAL_ESTIMATE_S, REHEARSAL_LIMIT_S = 5.0, 120.0


@dataclass
class Context:
    """What a part gets from the suite."""
    scale: Scale
    work: str                           # a scratch folder of this part's own, removed after it
    shared: str                         # the suite's work folder (the demo data lives there)
    output: str                         # the suite's output folder (files that must come back)
    deadline: float                     # time.time() at which the part is stopped
    later_estimate_s: float = 0.0       # estimated seconds of the parts after this one (the tests leave them room)
    data: Optional[str] = None          # the demo data the "data" part made
    peak_override: Dict[str, Optional[float]] = field(default_factory=dict)
    rehearse: bool = False


@dataclass
class Part:
    name: str
    group: str                          # setup | bench | tests | profile
    estimate_s: float                   # on one H100/H200, cold caches; not measured yet
    what: str
    run: Callable[[Context, "Part"], Dict[str, Any]]
    settings: Dict[str, Any] = field(default_factory=dict)   # sizes by name ("B", "XL") resolve through the Scale
    optional: bool = False              # run only when the others leave room (or named with --only)
    needs_data: bool = False
    limit_s: Optional[float] = None     # stopped past this; default: twice the estimate, at least a minute more
    # What can still be read from the part's work folder when it was killed before it returned (the tests' log).
    salvage: Optional[Callable[[Context], Dict[str, Any]]] = None

    def limit(self, rehearse: bool) -> float:
        if self.limit_s is not None:
            return self.limit_s
        return REHEARSAL_LIMIT_S if rehearse else max(2 * self.estimate_s, self.estimate_s + 60)

    def estimate(self, rehearse: bool) -> float:
        """Seconds it is expected to take: the GPU estimate, or the rehearsal's (every part runs there)."""
        return REHEARSAL_ESTIMATE_S if rehearse else self.estimate_s

    def resolved(self, scale: Scale) -> Dict[str, Any]:
        """The settings as run at this scale (the results record these)."""
        s = dict(self.settings)
        if "size" in s:
            s["model"] = scale.models[s["size"]]
        for key in ("sampler", "evaluator", "fid", "profile"):
            if s.get(key):
                s[key] = getattr(scale, key)
        return s


class PartFailed(RuntimeError):
    """A part that measured something before it failed: its result is kept beside the error."""

    def __init__(self, message: str, result: Dict[str, Any]):
        super().__init__(message)
        self.result = result


#################################################################################
#                                  Helpers                                      #
#################################################################################

def preload() -> Dict[str, str]:
    """Import PRELOAD now (the parts are forked from this process); {module: error} for those that failed, whose
    parts will then fail with the same error in their own process."""
    import importlib
    failed = {}
    for name in PRELOAD:
        module, _, attribute = name.partition(":")
        try:
            loaded = importlib.import_module(module)
            if attribute:
                getattr(loaded, attribute)
        except Exception as e:  # a missing optional package fails the parts that need it, not the suite
            failed[name] = f"{type(e).__name__}: {e}"
    return failed


def package_versions() -> Dict[str, Optional[str]]:
    versions = {}
    for name in ["torch", "numpy"] + list(OPTIONAL_PACKAGES):
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _meta_sit(scale: Scale, size: str, phase: int, with_teacher: bool = True):
    from models.sit import create_sit
    with torch.device("meta"):  # the architecture without allocating it
        if phase == 1:
            return create_sit(scale.models[size], input_size=scale.resolution // 8, z_dims=[scale.teacher_width],
                              encoder_depth=scale.warmup_depth, built_depth=scale.warmup_depth)
        return create_sit(scale.models[size], input_size=scale.resolution // 8,
                          z_dims=[scale.teacher_width] if with_teacher else [], encoder_depth=scale.encoder_depth[size])


def teacher_flops(scale: Scale) -> int:
    """FLOPs of the scale's teacher (DINOv2-B/14, or the rehearsal's random tiny ViT) on the meta device."""
    import timm

    from models.encoders import DINOV2_MODELS, RANDOM_TEACHER, RANDOM_TEACHER_ARCH, teacher_input_size
    tiny = scale.teacher == RANDOM_TEACHER
    with torch.device("meta"):
        vit = timm.create_model(DINOV2_MODELS["s" if tiny else "b"][0], pretrained=False, num_classes=0,
                                img_size=teacher_input_size(scale.resolution), **(RANDOM_TEACHER_ARCH if tiny else {}))
    return flops.vit_forward_flops(vit)["total"]


def flop_table(scale: Scale) -> Dict[str, Dict[str, float]]:
    """FLOPs per image of everything the benchmarks time (see bench/flops.py)."""
    teacher = teacher_flops(scale)
    table = {f"{scale.teacher} teacher forward": {"forward": teacher, "per_image": teacher}}
    for size, phase in (("B", 2), ("XL", 2), ("XL", 1)):
        fwd = flops.sit_forward_flops(_meta_sit(scale, size, phase))["total"]
        k = f" (k={scale.warmup_depth})" if phase == 1 else ""
        table[f"{scale.models[size]} Phase {phase}{k} training step, teacher included"] = {
            "forward": fwd, "per_image": flops.training_step_flops(fwd, teacher)}
    row = flops.sit_forward_flops(_meta_sit(scale, "XL", 2, with_teacher=False), with_projectors=False)["total"]
    table[f"{scale.models['XL']} sampling forward, per model row"] = {"forward": row, "per_image": row}
    table["Inception-v3 (evaluator) forward"] = {"forward": flops.inception_forward_flops(),
                                                 "per_image": flops.inception_forward_flops()}
    return table


def peak(ctx: Context) -> Dict[str, Optional[float]]:
    """Dense bf16 and fp32 peaks of this process's GPU (None on the CPU), --peak-tflops overriding."""
    found = flops.peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else {"bf16": None,
                                                                                              "fp32": None}
    return {k: ctx.peak_override.get(k) or v for k, v in found.items()}


def _throughput(ctx: Context, images_per_sec: float, per_image: float, precision: str) -> Dict[str, Any]:
    tflops = images_per_sec * per_image / 1e12
    top = peak(ctx).get("fp32" if precision in ("fp32", "tf32") else "bf16")
    return {"achieved_tflops": round(tflops, 3), "peak_tflops": top, "peak_precision": precision,
            "mfu": round(flops.mfu(images_per_sec, per_image, top), 4) if top else None}


def _free_device():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _scratch(ctx: Context, gigabytes: float) -> str:
    """A folder for a run's checkpoints (the loop always saves at its last step): RAM-backed /dev/shm when it has
    room, so the benchmark does not wait for a disk, else the part's work folder. Removed by the caller."""
    if not ctx.rehearse and os.path.isdir(SHM) and shutil.disk_usage(SHM).free > 2 * gigabytes * 2 ** 30:
        return tempfile.mkdtemp(prefix=shm_prefix(os.getppid()), dir=SHM)
    return tempfile.mkdtemp(prefix="run-", dir=ctx.work)


def shm_prefix(suite_pid: int) -> str:
    """Name prefix of the /dev/shm folders a part of the suite with this pid makes (the suite removes them after
    each part, also when the part was killed)."""
    return f"erw-gpu-suite-{suite_pid}-"


def use_compile_backend(backend: Optional[str]) -> None:
    """Make every Module.compile() in this process use `backend` (the rehearsal's "eager"); None leaves torch's."""
    if backend is None:
        return
    original = torch.nn.Module.compile

    def compile_with_backend(self, *args, **kwargs):
        kwargs["backend"] = backend
        return original(self, *args, **kwargs)

    torch.nn.Module.compile = compile_with_backend


#################################################################################
#                                    Parts                                      #
#################################################################################

def run_env(ctx: Context, part: Part) -> Dict[str, Any]:
    """What ran where: the GPU, the versions, the peaks, the FLOPs per image (in a part, so that a missing package
    fails this part and not the suite)."""
    scale = ctx.scale
    cuda = torch.cuda.is_available()
    if not cuda and not ctx.rehearse:
        raise RuntimeError("no CUDA GPU visible to torch (`--rehearse` runs the suite on the CPU at toy sizes)")
    found = peak(ctx)
    return {"gpu": torch.cuda.get_device_name() if cuda else None, "gpu_count": torch.cuda.device_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "packages": package_versions(),
            "peak_tflops": found, "peak_source": "--peak-tflops" if ctx.peak_override else "GPU name (bench/flops.py)",
            "flop_table": {k: v["per_image"] for k, v in flop_table(scale).items()},
            "flop_formula": flops.__doc__}


def run_data(ctx: Context, part: Part) -> Dict[str, Any]:
    """The generated demo dataset (preprocessing/dataset_tools.py make-demo), encoded by the random tiny VAE."""
    from preprocessing import dataset_tools
    dest = os.path.join(ctx.shared, f"demo-{ctx.scale.resolution}")
    dataset_tools.main(["make-demo", "--dest", dest, "--resolution", str(ctx.scale.resolution),
                        "--images-per-class", str(ctx.scale.images_per_class), "--vae", "random-tiny"])
    return {"data_dir": dest, "images": 10 * ctx.scale.images_per_class}


def training_argv(ctx: Context, size: str, phase: int, compile_: bool, out: str, name: str, steps: int,
                  log_every: int) -> List[str]:
    scale = ctx.scale
    argv = ["--config", CONFIGS[size], "--model", scale.models[size], "--data-dir", ctx.data, "--output-dir", out,
            "--exp-name", name, "--resolution", str(scale.resolution), "--enc-type", scale.teacher,
            "--batch-size", str(scale.batch), "--mixed-precision", PRECISION, "--num-workers", str(scale.num_workers),
            "--report-to", "none", "--max-train-steps", str(steps), "--log-every", str(log_every),
            "--checkpointing-steps", str(BIG), "--warmup-depth", str(scale.warmup_depth),
            "--compile" if compile_ else "--no-compile"]
    if phase == 2:
        argv += ["--warmup-ckpt", "none", "--encoder-depth", str(scale.encoder_depth[size]),
                 "--vae", os.path.join(ctx.data, "vae"), "--sample-grid-every", str(BIG),
                 "--sample-grid-size", "4", "--sample-num-steps", "2"]
    return argv


def _training_flops(scale: Scale, size: str, phase: int) -> int:
    return flops.training_step_flops(flops.sit_forward_flops(_meta_sit(scale, size, phase))["total"],
                                     teacher_flops(scale))


def _checkpoint_gigabytes(scale: Scale, size: str, phase: int) -> float:
    """Model + EMA + two AdamW moments, float32."""
    return sum(p.numel() for p in _meta_sit(scale, size, phase).parameters()) * 16 / 2 ** 30


def run_training(ctx: Context, part: Part) -> Dict[str, Any]:
    """The real training loop for train_steps steps; throughput of the log windows after the first."""
    import train
    import train_warmup
    from bench.loop_probe import ObjectiveProbe, probing
    s, scale = part.settings, ctx.scale
    entry = train_warmup if s["phase"] == 1 else train
    use_compile_backend(scale.compile_backend if s["compile"] else None)
    out = _scratch(ctx, _checkpoint_gigabytes(scale, s["size"], s["phase"]))
    probe = ObjectiveProbe(start=scale.log_every, stop=scale.train_steps - 1)  # steps log_every+1 .. train_steps-1
    try:
        with probing(entry, probe):
            result = entry.main(training_argv(ctx, s["size"], s["phase"], s["compile"], out, part.name,
                                              scale.train_steps, scale.log_every))
        history = result["history"]
        del result
    finally:
        shutil.rmtree(out, ignore_errors=True)
        _free_device()
    windows = [round(r["images_per_sec"], 2) for r in history]
    images_per_sec = statistics.mean(windows[1:])
    synced = scale.batch * probe.steps / probe.seconds if probe.seconds else None
    per_image = _training_flops(scale, s["size"], s["phase"])
    return {"measured_with": "real training loop (train.main / train_warmup.main), teacher included",
            "images_per_sec": round(images_per_sec, 2), "step_s": round(scale.batch / images_per_sec, 4),
            "images_per_sec_by_window": windows, "first_window_excluded": "warm-up / compilation",
            "synced_images_per_sec": round(synced, 2) if synced else None,
            "synced_window": f"steps {probe.start + 1}..{probe.stop} (torch.cuda.synchronize() at both ends)",
            "flops_per_image": per_image, **_throughput(ctx, images_per_sec, per_image, PRECISION),
            "final_loss": history[-1].get("loss")}


def run_sampler(ctx: Context, part: Part) -> Dict[str, Any]:
    """bench/bench_sampler.py's cases on SiT-XL/2 (latent sampler, no VAE decode), bf16 autocast."""
    import argparse

    from bench.bench_sampler import CFG_CASES, run_case
    from erw.precision import precision_scope
    from models.sit import create_sit
    scale, s = ctx.scale, ctx.scale.sampler
    device = torch.device(scale.device)
    try:
        with precision_scope(PRECISION) as autocast_dtype:
            with device:  # random init on the device: the weights do not change the speed
                model = create_sit(scale.models["XL"], input_size=scale.resolution // 8, num_classes=1000, z_dims=[])
            model = model.eval().requires_grad_(False)
            row = flops.sit_forward_flops(model, with_projectors=False)["total"]
            args = argparse.Namespace(input_size=scale.resolution // 8, mode=s["mode"], heun=False,
                                      num_steps=s["num_steps"], batch_size=s["batch_size"], batches=1,
                                      micro_batch_size=0, noise_source="per-sample")
            cases = {}
            for case in CFG_CASES:
                if case[0] in part.settings["cases"]:
                    with torch.no_grad():
                        r = run_case(model, device, args, case, autocast_dtype)
                    per_sample = r["model_rows_per_sample"] * row
                    cases[case[0]] = {**r, "images_per_sec": round(r["samples_per_s"], 2),
                                      "flops_per_image": per_sample,
                                      **_throughput(ctx, r["samples_per_s"], per_sample, PRECISION)}
    finally:
        _free_device()
    return {"measured_with": "bench/bench_sampler.py run_case", "flops_per_model_row": row, "cases": cases}


def run_evaluator(ctx: Context, part: Part) -> Dict[str, Any]:
    """bench/bench_evaluator.py's end-to-end mode: evaluate() on synthetic .npz files (random Inception weights),
    written into the part's work folder (50K images at 256 px: 9.8 GB)."""
    from bench.bench_evaluator import bench_end_to_end
    s = ctx.scale.evaluator
    try:
        r = bench_end_to_end(s["n_samples"], s["n_ref"], s["image_size"], s["batch_size"],
                             torch.device(ctx.scale.device), ctx.work, is_split_size=s["is_split_size"])
    finally:
        _free_device()
    stages = r["stages_s"]
    network_s = stages.get("reference_activations", 0) + stages.get("sample_activations", 0)
    images = s["n_samples"] + s["n_ref"]
    per_image = flops.inception_forward_flops()
    return {**r, "measured_with": "bench/bench_evaluator.py bench_end_to_end",
            "images_per_sec": round(images / network_s, 1) if network_s else None,
            "images_per_sec_means": "Inception activations of samples + reference, per second of those two stages",
            "end_to_end_samples_per_sec": round(s["n_samples"] / r["evaluate_s"], 1), "flops_per_image": per_image,
            **(_throughput(ctx, images / network_s, per_image, "fp32") if network_s else {})}


def fid_estimate(batch_seconds: List[float], batch_sizes: List[int], metrics_s: float, n: int, gpus: int
                 ) -> Dict[str, Any]:
    """A full in-training FID from a timed subset: the first batch holds one-off costs (cuDNN plans, allocator
    growth, cold kernels) that a longer run pays once, so the per-sample time comes from the later batches only and
    the first batch's excess is added once:
        per_sample = sum(t_2..t_B) / sum(n_2..n_B),  one_off = t_1 - per_sample n_1,
        estimate(n, g) = n / g * per_sample + one_off + metrics."""
    if len(batch_seconds) < 2:
        raise ValueError("the FID estimate needs at least two timed batches (the first holds one-off costs)")
    per_sample = sum(batch_seconds[1:]) / sum(batch_sizes[1:])
    one_off = batch_seconds[0] - per_sample * batch_sizes[0]
    return {"per_sample_s": per_sample, "first_batch_one_off_s": round(one_off, 3),
            f"estimate_{n // 1000}k_1gpu_s": round(n * per_sample + one_off + metrics_s, 1),
            f"estimate_{n // 1000}k_{gpus}gpu_s": round(n / gpus * per_sample + one_off + metrics_s, 1)}


def run_fid(ctx: Context, part: Part) -> Dict[str, Any]:
    """One in-training FID (evaluations/training_fid.py FidHook.measure: generation, SD-VAE decode, Inception, FID,
    sFID, IS) of SiT-XL/2, random weights, on a subset of the samples, each batch timed; a full 10K-sample FID is
    extrapolated by fid_estimate."""
    from types import SimpleNamespace

    import numpy as np

    from evaluations import training_fid
    from evaluations.inception import POOL_DIM, SPATIAL_DIM
    from models.sit import create_sit
    scale, s = ctx.scale, ctx.scale.fid
    device = torch.device(scale.device)
    # Reference statistics in the file, as ADM's VIRTUAL_imagenet256_labeled.npz holds them: no reference pass.
    ref = os.path.join(ctx.work, "ref.npz")
    np.savez(ref, np.zeros((4, scale.resolution, scale.resolution, 3), np.uint8), mu=np.zeros(POOL_DIM),
             sigma=np.eye(POOL_DIM), mu_s=np.zeros(SPATIAL_DIM), sigma_s=np.eye(SPATIAL_DIM))
    config = {"fid_ref": ref, "fid_every": 1, "max_train_steps": 1, "fid_num_samples": s["num_samples"],
              "fid_num_steps": s["num_steps"], "fid_mode": "sde", "fid_precision": PRECISION, "seed": 0,
              "path_type": "linear", "cfg_scale": 1.0, "guidance_low": 0.0, "guidance_high": 1.0,
              "inception_weights": "random", "vae": "random-sd-vae"}
    trainer = SimpleNamespace(accelerator=SimpleNamespace(process_index=0, num_processes=1, is_main_process=True),
                              device=device, local_batch_size=s["batch_size"], log=print)
    # Each batch timed from its request to the next request: generation, VAE decode and the Inception features the
    # hook computes before asking for the next batch (they come back as numpy arrays: the GPU is done with them).
    stamps, sizes = [], []
    generate = training_fid.generate_images

    def timed_generate(*args, **kwargs):
        stamps.append(time.perf_counter())
        for batch, images in generate(*args, **kwargs):
            sizes.append(len(batch))
            yield batch, images
            stamps.append(time.perf_counter())

    training_fid.generate_images = timed_generate
    try:
        hook = training_fid.FidHook(config, trainer)
        with device:  # random init on the device: the weights do not change the speed
            model = create_sit(scale.models["XL"], input_size=scale.resolution // 8, num_classes=1000, z_dims=[])
        model = model.eval().requires_grad_(False)
        row = flops.sit_forward_flops(model, with_projectors=False)["total"]
        r = hook.measure(model, desc="FID benchmark")
    finally:
        training_fid.generate_images = generate
        _free_device()
    batch_seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    metrics_s = r["fid_seconds"] - r["fid_sample_seconds"]
    estimate = fid_estimate(batch_seconds, sizes, metrics_s, s["extrapolate_to"], s["gpus_for_estimate"])
    per_image = s["num_steps"] * row  # SiT forwards only (no CFG); the VAE and the Inception are not counted
    return {"measured_with": "evaluations/training_fid.py FidHook.measure", "samples_timed": s["num_samples"],
            "batch_seconds": [round(t, 4) for t in batch_seconds], "batch_sizes": sizes,
            "sample_seconds": r["fid_sample_seconds"], "metrics_seconds": round(metrics_s, 3),
            **estimate, "images_per_sec": round(1 / estimate["per_sample_s"], 2), "flops_per_image": per_image,
            "flops_per_image_means": f"{s['num_steps']} SiT forwards (VAE decode and Inception not counted)",
            **_throughput(ctx, 1 / estimate["per_sample_s"], per_image, PRECISION)}


class _ReportLog:
    """A pytest plugin: one JSON line per finished test phase, flushed at once, so a killed run keeps its results."""

    def __init__(self, path: str):
        self.path = path

    def pytest_runtest_logreport(self, report):
        import json
        if report.when == "call" or report.outcome != "passed":
            entry = {"test": report.nodeid.split("::")[-1], "when": report.when, "outcome": report.outcome,
                     "seconds": round(report.duration, 1)}
            if report.outcome != "passed":
                entry["message"] = str(report.longrepr)[-1000:]
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")


def run_tests(ctx: Context, part: Part) -> Dict[str, Any]:
    """pytest -m gpu tests/test_gpu.py in this process; a test that would run past the time the later parts leave
    skips. Results from the JUnit XML (pytest writes it when SIGINT stops it at the deadline), else from the
    per-test log a killed run leaves."""
    import pytest
    deadline = ctx.deadline - ctx.later_estimate_s
    junit = os.path.join(ctx.output, JUNIT_NAME)
    report_log = os.path.join(ctx.work, REPORT_LOG_NAME)
    # No third-party pytest plugins (the GPU image has hypothesis, xdist, cov, timeout): they cost start-up time, and
    # hypothesis' end-of-session import alone can outlast the grace period after SIGINT, before the XML is written.
    os.environ.update({"ERW_GPU_DEADLINE": str(deadline), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                       "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    if ctx.data:
        os.environ["ERW_GPU_DATA"] = ctx.data
    if ctx.rehearse:
        os.environ["ERW_GPU_REHEARSE"] = "1"
    use_compile_backend(ctx.scale.compile_backend)
    args = ["-m", "gpu", "-p", "no:cacheprovider", "-q", "-rfEs", f"--junitxml={junit}", f"--rootdir={REPO_ROOT}",
            f"--basetemp={os.path.join(ctx.work, 'pytest')}", os.path.join(REPO_ROOT, GPU_TESTS)]
    os.chdir(REPO_ROOT)
    returncode = int(pytest.main(args, plugins=[_ReportLog(report_log)]))
    tests = junit_results(junit) or log_results(report_log)
    counts: Dict[str, int] = {}
    for t in tests:
        counts[t["status"].split(":")[0]] = counts.get(t["status"].split(":")[0], 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in counts.items()) or f"pytest exit {returncode}"
    result = {"command": "pytest " + " ".join(args), "returncode": returncode, "summary": summary, "tests": tests}
    if returncode not in (0, 5):  # 5: no test selected
        raise PartFailed(f"pytest: {summary} (exit {returncode})", result)
    return result


def salvage_tests(ctx: Context) -> Dict[str, Any]:
    """The tests that finished before pytest was killed, from _ReportLog's lines."""
    tests = log_results(os.path.join(ctx.work, REPORT_LOG_NAME))
    return {"tests": tests, "summary": f"{len(tests)} test(s) logged before pytest was killed"}


def junit_results(path: str) -> List[Dict[str, Any]]:
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


def log_results(path: str) -> List[Dict[str, Any]]:
    """The same from _ReportLog's lines: one entry per test, its worst phase."""
    import json
    if not os.path.isfile(path):
        return []
    tests: Dict[str, Dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            status = {"passed": "passed", "skipped": "skipped: ", "failed": "failed"}[r["outcome"]]
            if status.startswith("skipped"):
                status += r.get("message", "")[-200:]
            entry = tests.setdefault(r["test"], {"test": r["test"], "status": status, "seconds": 0.0})
            entry["seconds"] = round(entry["seconds"] + r["seconds"], 1)
            if status != "passed":
                entry["status"] = status
                if "message" in r and status == "failed":
                    entry["message"] = r["message"]
    return list(tests.values())


PROFILE_CATEGORIES = [  # first match wins; kernel names on a GPU, aten op names on the CPU
    ("data loading", r"dataloader"),
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot_product"),
    ("matmul and conv", r"gemm|xmma|cutlass|cublas|matmul|\bmm\b|addmm|bmm|linear|conv|sm90_"),
    ("norm", r"layer_norm|layernorm|rms_norm"),
    ("optimizer and EMA", r"adam|multi_tensor|foreach|lerp"),
    ("copies and casts", r"copy|memcpy|memset|aten::to\b|_to_copy|cat"),
    ("elementwise (adaLN modulation, activations)", r"elementwise|vectorized|mul|add|gelu|silu|sigmoid|exp|div|sub"),
    ("reductions", r"reduce|sum|mean|norm"),
]


def profile_summary(events, on_gpu: bool, steps: int, top: int = 15) -> Dict[str, Any]:
    """Time per category and the top ops from torch.profiler's key_averages(): self device time of the GPU kernels,
    or self CPU time of the ops on the CPU; per profiled step, in ms."""
    rows = []
    for e in events:
        t = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) if on_gpu \
            else e.self_cpu_time_total
        if t > 0:
            category = next((c for c, pattern in PROFILE_CATEGORIES if re.search(pattern, e.key, re.IGNORECASE)),
                            "other")
            rows.append((e.key, category, t / 1000 / steps, e.count // max(steps, 1)))
    total = sum(r[2] for r in rows) or 1.0
    by_category: Dict[str, float] = {}
    for _, category, ms, _ in rows:
        by_category[category] = by_category.get(category, 0.0) + ms
    rows.sort(key=lambda r: -r[2])
    return {"time_measured": "self GPU-kernel time" if on_gpu else "self CPU time of the ops",
            "total_ms_per_step": round(total, 3),
            "by_category_ms_per_step": {c: round(ms, 3)
                                        for c, ms in sorted(by_category.items(), key=lambda kv: -kv[1])},
            "top": [{"name": name[:120], "category": c, "ms_per_step": round(ms, 3), "calls_per_step": n}
                    for name, c, ms, n in rows[:top]]}


def profile_markdown(summary: Dict[str, Any], title: str) -> str:
    lines = [f"# {title}", "", f"{summary['time_measured']}, per step: {summary['total_ms_per_step']} ms", "",
             "| category | ms / step | share |", "|---|---|---|"]
    total = summary["total_ms_per_step"] or 1.0
    for c, ms in summary["by_category_ms_per_step"].items():
        lines.append(f"| {c} | {ms} | {100 * ms / total:.1f} % |")
    lines += ["", "| op or kernel | category | ms / step | calls / step |", "|---|---|---|---|"]
    for r in summary["top"]:
        lines.append(f"| `{r['name']}` | {r['category']} | {r['ms_per_step']} | {r['calls_per_step']} |")
    return "\n".join(lines) + "\n"


def run_profile(ctx: Context, part: Part) -> Dict[str, Any]:
    """torch.profiler over a few steps of the real SiT-XL/2 Phase-2 loop (teacher, bf16, batch 32), after warm-up;
    the summary table goes to the output folder as PROFILE_NAME."""
    import train
    from bench.loop_probe import ObjectiveProbe, probing
    from erw.files import atomic_write
    scale, p = ctx.scale, ctx.scale.profile
    on_gpu = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    profiler = torch.profiler.profile(activities=activities, record_shapes=False)

    class ProfileProbe(ObjectiveProbe):
        def before_call(self):
            if self.calls == self.start:
                profiler.start()
            super().before_call()
            if self.calls - 1 == self.stop:
                profiler.stop()

    probe = ProfileProbe(start=p["start"], stop=p["stop"])
    out = _scratch(ctx, _checkpoint_gigabytes(scale, "XL", 2))
    try:
        with probing(train, probe):
            train.main(training_argv(ctx, "XL", 2, False, out, part.name, p["steps"], p["steps"]))
    finally:
        shutil.rmtree(out, ignore_errors=True)
        _free_device()
    summary = profile_summary(profiler.key_averages(), on_gpu, probe.steps)
    summary["wall_ms_per_step"] = round(1000 * probe.seconds / probe.steps, 2) if probe.seconds else None
    title = (f"{scale.models['XL']} Phase 2 step profile: batch {scale.batch}, {PRECISION}, teacher "
             f"{scale.teacher}, micro-batches {probe.start + 1}..{probe.stop}; wall {summary['wall_ms_per_step']} "
             "ms per step")
    path = os.path.join(ctx.output, PROFILE_NAME)
    atomic_write(path, lambda f: f.write(profile_markdown(summary, title).encode()))
    return {**summary, "table": path}


def run_teacher_cache(ctx: Context, part: Part) -> Dict[str, Any]:
    """bench/bench_teacher_cache.py's Phase-1 comparison on SiT-XL/2 (k blocks): the step fed by the live teacher
    against the step fed by cached float16 tokens, alternated in this process."""
    from bench.bench_teacher_cache import bench_phase1
    from models.encoders import build_teacher
    scale = ctx.scale
    try:
        return bench_phase1(scale.models["XL"], scale.warmup_depth, scale.batch, scale.resolution,
                            part.settings["steps"], 1, torch.device(scale.device),
                            build_teacher(scale.teacher, scale.resolution))
    finally:
        _free_device()


def _train_part(name, size, phase, compile_, estimate_s, optional=False):
    what = (f"SiT-{size}/2 Phase {phase}" + (" (k blocks)" if phase == 1 else "") +
            (" --compile" if compile_ else " eager") + ": real training loop, teacher included, bf16")
    settings = {"size": size, "phase": phase, "compile": compile_, "config": os.path.relpath(CONFIGS[size], REPO_ROOT),
                "precision": PRECISION}
    return Part(name, "bench", estimate_s, what, run_training, settings, optional, needs_data=True)


# In run order. Estimates for one H100/H200 with cold caches (nothing measured yet); the suite prints the real times
# beside them. The benchmarks come first, so that a failure in the tests costs no figure.
PARTS = [
    Part("env", "setup", 15, "GPU, versions, peaks, FLOPs per image", run_env),
    Part("data", "setup", 15, "make-demo: 10 classes of generated images, random tiny VAE", run_data),
    _train_part("train-xl2-phase2", "XL", 2, False, 40),
    _train_part("train-xl2-phase1", "XL", 1, False, 25),
    Part("sampler-xl2", "bench", 35, "SiT-XL/2 sampling, SDE, bf16, without and with the CFG interval (1.8 on t <= "
         "0.7)", run_sampler, {"sampler": True, "cases": ("no-cfg", "cfg-interval")}),
    _train_part("train-b2-phase2", "B", 2, False, 25),
    Part("teacher-cache-xl2", "bench", 20, "SiT-XL/2 Phase-1 step (k blocks), live DINOv2-B teacher against cached "
         "float16 tokens, alternated", run_teacher_cache, {"steps": 5}),
    Part("evaluator-50k", "bench", 90, "ADM evaluator end to end on synthetic samples and references, random "
         "Inception", run_evaluator, {"evaluator": True}),
    # The tests take what the parts before them leave (a test that would not finish in time skips): ~150 s runs the
    # eager chains, the sampler, sample_ddp and the evaluator checks.
    Part("tests", "tests", 150, "pytest -m gpu tests/test_gpu.py (SiT-B/2 Phase 1 -> 2 -> resume in bf16/fp16 x "
         "eager/compile, host syncs of training and sampling, sample_ddp, evaluator GPU vs CPU)", run_tests,
         {"file": GPU_TESTS}, needs_data=True, salvage=salvage_tests),
    # Optional: when the others leave room, or named with --only.
    Part("fid-xl2-10k", "bench", 60, "in-training FID of SiT-XL/2 (SDE, bf16, SD-VAE, Inception) on a timed subset, "
         "extrapolated to 10K samples", run_fid, {"fid": True}, optional=True),
    _train_part("train-b2-phase2-compile", "B", 2, True, 90, optional=True),
    _train_part("train-xl2-phase2-compile", "XL", 2, True, 120, optional=True),
    Part("profile", "profile", 60, "torch.profiler over SiT-XL/2 Phase-2 steps (teacher, bf16, batch 32): time by "
         f"category and the top kernels, into {PROFILE_NAME}", run_profile, {"profile": True}, optional=True,
         needs_data=True),
]


#################################################################################
#                      A part in a fresh interpreter                            #
#################################################################################

def context_to_json(ctx: Context) -> Dict[str, Any]:
    return {**dataclasses.asdict(ctx), "scale": "rehearsal" if ctx.scale == REHEARSAL else "full"}


def child_main(argv=None) -> int:
    """`python -m bench.gpu_parts --part NAME --context FILE --result FILE`: one part in this process (the suite's
    spawn isolation, when it cannot fork), its outcome written as bench/part_runner.py writes it."""
    import argparse
    import json

    from bench.part_runner import run_and_record
    parser = argparse.ArgumentParser(description=child_main.__doc__)
    parser.add_argument("--part", required=True, choices=[p.name for p in PARTS])
    parser.add_argument("--context", required=True, help="JSON file of the part's Context (context_to_json)")
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    with open(args.context) as f:
        fields = json.load(f)
    ctx = Context(**{**fields, "scale": REHEARSAL if fields["scale"] == "rehearsal" else FULL})
    part = next(p for p in PARTS if p.name == args.part)
    return run_and_record(part.run, (ctx, part), args.result)


if __name__ == "__main__":
    raise SystemExit(child_main())
