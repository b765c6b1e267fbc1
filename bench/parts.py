"""The benchmark's parts: each a function of the Context that returns its figures (bench/run.py runs them in turn),
on the real architectures with random weights, offline. Training figures are the loop's own (metrics.jsonl); FLOPs
are FlopCounterMode's on the meta device. docs/benchmarks.md says what each part runs and how to read the figures.
"""
import json
import os
import shutil
import statistics
import time
import zipfile
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"B": os.path.join(REPO, "configs", "table4_sit_b2_erw.yaml"),
           "XL": os.path.join(REPO, "configs", "table1_2_sit_xl2_erw.yaml")}
PRECISION = "bf16"
NEVER = 10 ** 6  # checkpoint and sample-grid interval: only the run's end


@dataclass(frozen=True)
class Scale:
    """Every size the parts use: FULL on a GPU, REHEARSAL (--rehearse) on the CPU."""
    device: str
    resolution: int
    batch: int                          # per GPU
    teacher: str
    models: Dict[str, str]              # "B" / "XL" -> SiT registry name
    encoder_depth: Dict[str, int]       # Phase-2 projector block (configs: table 4 for B, tables 1-2 for XL)
    warmup_depth: int                   # Phase-1 blocks k
    train_steps: int
    log_every: int                      # the first of train_steps / log_every windows is left out
    images_per_class: int               # generated data: 10 classes
    num_workers: int
    sampler: Tuple[int, int]            # (SDE steps, batch)
    evaluator: Tuple[int, int, int, int]  # (samples, references, batch, Inception-Score split)
    fid: Tuple[int, int]                # (samples timed, SDE steps)
    loader_items: int                   # items read per data layout


FULL = Scale(device="cuda", resolution=256, batch=32, teacher="random-dinov2-vit-b",
             models={"B": "SiT-B/2", "XL": "SiT-XL/2"}, encoder_depth={"B": 8, "XL": 18}, warmup_depth=5,
             train_steps=40, log_every=10, images_per_class=16, num_workers=max(2, min(8, (os.cpu_count() or 4) // 2)),
             sampler=(250, 32), evaluator=(50_000, 10_000, 64, 5000), fid=(256, 50), loader_items=2048)
REHEARSAL = Scale(device="cpu", resolution=64, batch=4, teacher="random-vit-tiny",
                  models={"B": "SiT-Tiny/2", "XL": "SiT-Tiny/2"}, encoder_depth={"B": 2, "XL": 3}, warmup_depth=2,
                  train_steps=4, log_every=2, images_per_class=2, num_workers=0,
                  sampler=(3, 2), evaluator=(6, 8, 4, 3), fid=(4, 2), loader_items=64)


@dataclass
class Part:
    name: str
    what: str
    estimate_s: float                   # wall clock; the budget skips a part whose estimate no longer fits
    run: Callable[["Context"], Dict[str, Any]]


@dataclass
class Context:
    """What the parts share: sizes, a scratch folder, the GPU's peaks, and what several parts need, made once."""
    scale: Scale
    work: str
    peaks: Dict[str, Optional[float]]   # dense TFLOP/s by precision ("bf16", "fp32"), None where unknown
    compile: bool = False
    made: Dict[str, Any] = field(default_factory=dict)

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]

    def data(self) -> str:
        """The generated dataset (make-demo) at the scale's resolution, encoded by the random tiny VAE."""
        return self.once("data", lambda: make_data(self, os.path.join(self.work, "data")))

    def teacher(self) -> Tuple[int, int]:
        """The teacher's (token width, FLOPs of one image's forward)."""
        def count():
            from models.encoders import build_teacher
            teacher = build_teacher(self.scale.teacher, self.scale.resolution).to("meta")
            side = self.scale.resolution
            return teacher.embed_dim, meta_flops(lambda: teacher(torch.zeros(1, 3, side, side, dtype=torch.uint8)))
        return self.once("teacher", count)


def make_data(ctx: Context, dest: str) -> str:
    from preprocessing import dataset_tools
    dataset_tools.main(["make-demo", "--dest", dest, "--resolution", str(ctx.scale.resolution),
                        "--images-per-class", str(ctx.scale.images_per_class), "--vae", "random-tiny"])
    return dest


def meta_flops(forward: Callable[[], Any]) -> int:
    """FLOPs of forward() as FlopCounterMode counts them, its tensors made on the meta device (nothing computed)."""
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        forward()
    return counter.get_total_flops()


def sit_forward_flops(ctx: Context, size: str, phase: int, aligned: bool = True) -> int:
    """One image through the SiT the loop builds (erw/loop.py sit_args): Phase 1 the k blocks and the
    projector, Phase 2 every block and, when aligned, the projector; aligned=False is a sampling row."""
    from models.sit import create_sit
    s = ctx.scale
    latent = s.resolution // 8
    z_dims = [ctx.teacher()[0]] if aligned else []  # before the meta device: the teacher's weights are real, cached
    with torch.device("meta"):
        model = create_sit(s.models[size], input_size=latent, z_dims=z_dims,
                           encoder_depth=s.warmup_depth if phase == 1 else s.encoder_depth[size],
                           built_depth=s.warmup_depth if phase == 1 else None)
    return meta_flops(lambda: model(torch.zeros(1, 4, latent, latent), torch.zeros(1),
                                    torch.zeros(1, dtype=torch.long), return_projections=aligned))


def figures(ctx: Context, rate: float, flops_per_item: Optional[int], precision: str, unit: str) -> Dict[str, Any]:
    """A table row: rate (items per second), FLOPs per item, achieved TFLOP/s and MFU against the GPU's peak."""
    tflops = rate * flops_per_item / 1e12 if flops_per_item else None
    peak = ctx.peaks.get(precision)
    return {"rate": rate, "unit": unit, "flops_per_item": flops_per_item, "precision": precision, "tflops": tflops,
            "mfu": tflops / peak if tflops is not None and peak else None}


def timed(fn: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def train_records(ctx: Context, size: str, phase: int, name: str, steps: int, *extra: str) -> List[Dict[str, Any]]:
    """Run the real loop (train.main, or train_warmup.main for Phase 1) and return its metrics.jsonl records; the
    run folder (with its checkpoint, ~11 GB for SiT-XL/2) is removed after it."""
    import train
    import train_warmup
    from operations.run import METRICS_FILE
    s, data = ctx.scale, ctx.data()
    out = os.path.join(ctx.work, "runs")
    argv = ["--config", CONFIGS[size], "--model", s.models[size], "--data-dir", data, "--output-dir", out,
            "--exp-name", name, "--resolution", str(s.resolution), "--enc-type", s.teacher,
            "--batch-size", str(s.batch), "--mixed-precision", PRECISION, "--num-workers", str(s.num_workers),
            "--report-to", "none", "--max-train-steps", str(steps), "--log-every", str(s.log_every),
            "--checkpointing-steps", str(NEVER), "--warmup-depth", str(s.warmup_depth),
            "--compile" if ctx.compile else "--no-compile"]
    if phase == 2:
        argv += ["--warmup-ckpt", "none", "--encoder-depth", str(s.encoder_depth[size]),
                 "--vae", os.path.join(data, "vae"), "--sample-grid-every", str(NEVER), "--sample-grid-size", "4",
                 "--sample-num-steps", "2"]
    try:
        (train if phase == 2 else train_warmup).main(argv + list(extra))
        with open(os.path.join(out, name, METRICS_FILE)) as f:
            return [json.loads(line) for line in f]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def loop_throughput(ctx: Context, size: str, phase: int, name: str, *extra: str) -> Dict[str, Any]:
    """images/s of the loop: the mean over its log windows after the first."""
    windows = [r["images_per_sec"] for r in train_records(ctx, size, phase, name, ctx.scale.train_steps, *extra)
               if "images_per_sec" in r]
    if len(windows) < 2:
        raise RuntimeError(f"{len(windows)} log window(s): need 2 or more (the first holds the start-up)")
    return {"images_per_sec": statistics.mean(windows[1:]), "windows": windows}


def training_part(size: str, phase: int) -> Callable[[Context], Dict[str, Any]]:
    """Phase 2: the loop with the live teacher. Phase 1: the live teacher, then the teacher's tokens cached once
    (dataset_tools cache-teachers) and read back: no teacher forward, no image decoded."""
    def run(ctx: Context) -> Dict[str, Any]:
        sit = sit_forward_flops(ctx, size, phase)
        live = loop_throughput(ctx, size, phase, "live")
        rows = {"live teacher": figures(ctx, live["images_per_sec"], 3 * sit + ctx.teacher()[1], PRECISION,
                                        "images/s")}
        result = {"rows": rows, "windows": {"live teacher": live["windows"]}}
        if phase == 1:
            from preprocessing import dataset_tools
            cache = os.path.join(ctx.work, "teacher-cache")
            dataset_tools.main(["cache-teachers", "--data-dir", ctx.data(), "--enc-type", ctx.scale.teacher, "--out",
                                cache, "--batch-size", str(ctx.scale.batch), "--workers", str(ctx.scale.num_workers)])
            cached = loop_throughput(ctx, size, phase, "cached", "--teacher-cache", cache)
            shutil.rmtree(cache, ignore_errors=True)
            rows["cached teacher tokens"] = figures(ctx, cached["images_per_sec"], 3 * sit, PRECISION, "images/s")
            result["windows"]["cached teacher tokens"] = cached["windows"]
            result["cached_over_live_images_per_sec"] = cached["images_per_sec"] / live["images_per_sec"]
        return result
    return run


class RowCounter(torch.nn.Module):
    """The SiT, counting the rows it is called on (a call inside the CFG interval costs two rows per sample)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes, self.rows = model, model.num_classes, 0

    def forward(self, x, t, y, return_projections=True):
        self.rows += x.shape[0]
        return self.model(x, t, y, return_projections=return_projections)


def run_sampler(ctx: Context) -> Dict[str, Any]:
    """SiT-XL/2 SDE sampling of latents (sample_ddp.py's per-sample noise, no VAE decode), bf16, one batch timed
    after a short warm-up batch: without guidance, and with REPA's CFG 1.8 on t <= 0.7."""
    from erw.generation import sample_inputs
    from erw.precision import precision_scope
    from erw.samplers import GuidedVelocity, sample_batch
    from erw.transport import get_path
    from models.sit import create_sit
    s, (steps, n) = ctx.scale, ctx.scale.sampler
    latent = s.resolution // 8
    with torch.device(s.device):  # random weights made on the device: they do not change the speed
        model = RowCounter(create_sit(s.models["XL"], input_size=latent, z_dims=[]).eval().requires_grad_(False))
    row = sit_forward_flops(ctx, "XL", 2, aligned=False)
    rows = {}
    with precision_scope(PRECISION) as autocast_dtype, torch.no_grad():
        for case, cfg, high in (("no CFG", 1.0, 1.0), ("CFG 1.8 on t <= 0.7", 1.8, 0.7)):
            velocity = GuidedVelocity(model, cfg, 0.0, high, autocast_dtype)

            def batch(first: int, num_steps: int):
                noise, labels, generators = sample_inputs(0, range(first, first + n), (4, latent, latent), 1000,
                                                          "random")
                sample_batch("sde", velocity, noise.to(s.device), labels.to(s.device), num_steps, get_path("linear"),
                             noise_source=generators)

            batch(0, min(steps, 3))
            model.rows = 0
            seconds = timed(lambda: batch(n, steps), s.device)
            rows[f"SDE {steps} steps, {case}"] = {**figures(ctx, n / seconds, model.rows * row // n, PRECISION,
                                                            "samples/s"), "model_rows_per_sample": model.rows / n}
    return {"rows": rows, "batch": n}


def write_random_npz(path: str, n: int, side: int, seed: int, chunk: int = 1024) -> None:
    """An uncompressed .npz with arr_0 = (n, side, side, 3) uint8, written in chunks (50K images at 256 px are
    9.8 GB): a pool of random images in a seed-dependent order."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, (min(chunk, n), side, side, 3), dtype=np.uint8)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (n, side, side, 3)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for start in range(0, n, chunk):
                f.write(pool[rng.permutation(len(pool))[:min(chunk, n - start)]].tobytes())


def run_evaluator(ctx: Context) -> Dict[str, Any]:
    """The ADM evaluator (evaluations/evaluator.py evaluate) end to end on random-image .npz files, random Inception
    weights (fp32, as the evaluator runs): IS, FID, sFID, precision and recall."""
    from evaluations.evaluator import evaluate
    from evaluations.inception import TFInceptionV3
    s, (n, n_ref, batch, split) = ctx.scale, ctx.scale.evaluator
    ref, samples = os.path.join(ctx.work, "ref.npz"), os.path.join(ctx.work, "samples.npz")
    try:
        write_random_npz(ref, n_ref, s.resolution, seed=1)
        write_random_npz(samples, n, s.resolution, seed=2)
        start = time.perf_counter()
        stages = evaluate(ref, samples, inception_weights="random", device=s.device, batch_size=batch,
                          is_split_size=split, use_cache=False, log=None)["timings_s"]
        seconds = time.perf_counter() - start
    finally:
        for path in (ref, samples):
            if os.path.exists(path):
                os.remove(path)
    network_s = stages["reference_activations"] + stages["sample_activations"]
    inception = meta_flops(lambda: TFInceptionV3()(torch.zeros(1, 3, s.resolution, s.resolution, dtype=torch.uint8)))
    return {"rows": {f"evaluate(): {n:,} samples + {n_ref:,} references, end to end": figures(
                         ctx, n / seconds, None, "fp32", "samples/s"),
                     "Inception activations of samples and references": figures(
                         ctx, (n + n_ref) / network_s, inception, "fp32", "images/s")},
            "evaluate_s": round(seconds, 1), "stages_s": stages}


def run_fid(ctx: Context) -> Dict[str, Any]:
    """One in-training FID (evaluations/training_fid.py, run by train.py --fid-every 1: EMA samples, SD-VAE decode,
    Inception, FID/sFID/IS) of SiT-XL/2 on a subset of samples; the second of two measurements (warm), timed by the
    loop itself, extrapolated to 10K samples on 1 and on 8 GPUs (the gathering between GPUs not counted)."""
    from evaluations.inception import POOL_DIM, SPATIAL_DIM
    s, (n, steps) = ctx.scale, ctx.scale.fid
    ref = os.path.join(ctx.work, "fid-ref.npz")  # statistics in the file, as ADM's reference batches hold them
    np.savez(ref, np.zeros((4, s.resolution, s.resolution, 3), np.uint8), mu=np.zeros(POOL_DIM),
             sigma=np.eye(POOL_DIM), mu_s=np.zeros(SPATIAL_DIM), sigma_s=np.eye(SPATIAL_DIM))
    records = train_records(ctx, "XL", 2, "fid", 2, "--enc-type", "none", "--fid-every", "1", "--fid-ref", ref,
                            "--fid-num-samples", str(n), "--fid-num-steps", str(steps), "--fid-mode", "sde",
                            "--fid-precision", PRECISION, "--inception-weights", "random", "--vae", "random-sd-vae")
    r = [r for r in records if "fid_seconds" in r][-1]
    per_sample, metrics_s = r["fid_sample_seconds"] / n, r["fid_seconds"] - r["fid_sample_seconds"]
    row = figures(ctx, 1 / per_sample, steps * sit_forward_flops(ctx, "XL", 2, aligned=False), PRECISION,
                  "samples/s")
    return {"rows": {f"{steps} SDE steps, SD-VAE decode, Inception ({n} samples timed)": row},
            "flops_counted": "the SiT's forwards only (no CFG); the VAE and the Inception are not counted",
            "fid_seconds": r["fid_seconds"], "sample_seconds": r["fid_sample_seconds"],
            "metrics_seconds": round(metrics_s, 3),
            "estimate_10k_1gpu_s": round(10_000 * per_sample + metrics_s, 1),
            "estimate_10k_8gpu_s": round(10_000 / 8 * per_sample + metrics_s, 1)}


def run_data_loading(ctx: Context) -> Dict[str, Any]:
    """Items/s that ONE DataLoader worker delivers (erw/data.py ImageLatentDataset, batches of 32, shuffled) from
    each layout the loop reads: per-file .npy latents or packed ones, with the images (a live teacher) or with
    cached teacher tokens. Just written, so from the page cache: the CPU's cost, an upper bound for a network disk."""
    from torch.utils.data import DataLoader, RandomSampler

    from erw.data import ImageLatentDataset
    from operations.teacher_cache import TeacherCache
    from preprocessing import dataset_tools
    s = ctx.scale
    folder, cache = os.path.join(ctx.work, "layouts"), os.path.join(ctx.work, "layouts-cache")
    make_data(ctx, folder)  # a copy of its own: packing it changes what the loop's data folder reads
    dataset_tools.main(["cache-teachers", "--data-dir", folder, "--enc-type", s.teacher, "--out", cache,
                        "--batch-size", str(s.batch), "--workers", "0"])

    def items_per_sec(dataset) -> float:
        batch = 32
        loader = iter(DataLoader(dataset, batch_size=batch, num_workers=1, drop_last=True,
                                 sampler=RandomSampler(dataset, num_samples=s.loader_items + 2 * batch)))
        for _ in range(2):  # the worker's start
            next(loader)
        return batch * (s.loader_items // batch) / timed(lambda: [next(loader) for _ in range(s.loader_items // batch)],
                                                         "cpu")

    rows = {}
    try:
        for layout in ("per-file", "packed"):
            if layout == "packed":
                dataset_tools.main(["pack", "--data-dir", folder, "--workers", "0"])
            for what, tokens in (("images for a live teacher", None), ("cached teacher tokens", TeacherCache(cache))):
                rows[f"{layout} latents, {what}"] = figures(
                    ctx, items_per_sec(ImageLatentDataset(folder, teacher_cache=tokens)), None, "-", "items/s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return {"rows": rows, "workers": 1}


# In run order; estimate_s: seconds on one recent data-center GPU, rough (the results file has the real ones).
PARTS = [
    Part("train-xl2-phase2", "SiT-XL/2 Phase 2, real loop, live DINOv2-B teacher, bf16", 90, training_part("XL", 2)),
    Part("train-xl2-phase1", "SiT-XL/2 Phase 1 (k blocks), live teacher, then cached teacher tokens", 120,
         training_part("XL", 1)),
    Part("train-b2-phase2", "SiT-B/2 Phase 2, real loop, live DINOv2-B teacher, bf16", 40, training_part("B", 2)),
    Part("sampler-xl2", "SiT-XL/2 SDE sampling, without and with the CFG interval", 60, run_sampler),
    Part("data-loading", "one DataLoader worker: per-file and packed latents, with images or cached tokens", 40,
         run_data_loading),
    Part("evaluator-50k", "ADM evaluator end to end on 50K random samples and 10K references", 150, run_evaluator),
    Part("fid-xl2", "one in-training FID of SiT-XL/2, timed on a subset and extrapolated to 10K samples", 90, run_fid),
]
REHEARSAL_ESTIMATE_S = 10.0


def parts_for(rehearse: bool) -> List[Part]:
    return [replace(p, estimate_s=REHEARSAL_ESTIMATE_S) for p in PARTS] if rehearse else list(PARTS)
