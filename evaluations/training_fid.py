"""FID during Phase 2 (train.py --fid-every): FID, sFID and Inception Score (and FD-DINOv2 with --fd-dinov2) of EMA
samples against a reference batch, logged at that step: sample_ddp.py's images and the evaluator's numbers on them,
so that the standalone pipeline gives the same numbers (docs/evaluation.md, "FID during training").
"""
import os
import time
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist

from operations.cli import InvalidInput, MissingInput, refusals
from erw.generation import bitwise_scope, generate_images
from erw.precision import precision_scope
from evaluations import evaluator, fd_dinov2
from evaluations.inception import RANDOM_WEIGHTS, inception_weights_id
from models.vae import load_vae

FEATURES = ("pool", "spatial", "probs")


class FidHook:
    """Training hook (erw/loop.py): at every `fid_every`-th step and the last one, on every process."""

    all_processes = True  # each process samples its share

    def __init__(self, config: Dict[str, Any]):
        """Checks the settings and loads what every FID needs (VAE, Inception, DINOv2 for FD-DINOv2) now, so that a
        missing file stops the run before it writes anything; start() puts them on the run's device."""
        if not config["fid_ref"]:
            raise InvalidInput(f"--fid-every {config['fid_every']}: give the reference batch with --fid-ref "
                               "(e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
        if not os.path.isfile(config["fid_ref"]):
            raise MissingInput(f"--fid-ref {config['fid_ref']}: file not found")
        if not 0.0 <= config["guidance_low"] <= config["guidance_high"] <= 1.0:
            raise InvalidInput(f"need 0 <= --guidance-low <= --guidance-high <= 1, got {config['guidance_low']}, "
                               f"{config['guidance_high']}")
        self.config = config
        self.every, self.last_step = config["fid_every"], config["max_train_steps"]
        self.num_samples, self.precision = config["fid_num_samples"], config["fid_precision"]
        self.sampler = dict(global_seed=config["seed"], label_mode="random", mode=config["fid_mode"],
                            num_steps=config["fid_num_steps"], heun=False, path_type=config["path_type"],
                            cfg_scale=config["cfg_scale"], guidance_low=config["guidance_low"],
                            guidance_high=config["guidance_high"], pixel_rounding="repa")
        self.random_inception = config["inception_weights"] == RANDOM_WEIGHTS
        self.reference = evaluator.open_images(config["fid_ref"])  # header checks on every process
        side = config["resolution"]
        if self.reference.shape[1:3] != (side, side):
            raise InvalidInput(f"--fid-ref {config['fid_ref']} holds {self.reference.shape[1]}x"
                               f"{self.reference.shape[2]} images, but this run samples {side}x{side} ones: an FID "
                               "between two resolutions; give the reference batch of the run's resolution")
        cpu = torch.device("cpu")
        self.inception = evaluator.load_inception(config["inception_weights"], cpu)
        self.fd = fd_dinov2.FdDinov2(config["fd_dinov2"], cpu, "--fd-dinov2") if config["fd_dinov2"] else None
        with refusals("--vae"):
            self.vae = load_vae(config["vae"])

    def start(self, run) -> None:
        """On the run's device, with its processes; the main process computes the reference statistics."""
        config = self.config
        self.rank, self.world_size, self.is_main = run.rank, run.world_size, run.is_main
        self.device = run.device
        self.batch_size = run.local_batch_size  # fits: training holds this batch with its gradients
        self.chunk_size = 1 if config["fid_bitwise"] else 0
        self.inception, self.vae = self.inception.to(self.device), self.vae.to(self.device)
        if self.fd is not None:
            self.fd.to(self.device)
        # A CPU group for the gathered activations (about 200 MB for 10K samples): they stay off the GPUs. Created
        # by every process, in the same order, as new_group requires.
        self.group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.reference_stats = self.fd_reference = None
        if not self.is_main:
            return
        path = config["fid_ref"]
        self.reference_stats = evaluator.read_statistics(path)
        source = f"its mu/sigma/mu_s/sigma_s ({len(self.reference):,} images)"
        if self.reference_stats is None or self.fd is not None:
            cache_dir = evaluator.default_cache_dir()
            evaluator.check_writable(cache_dir, "the evaluator's cache folder", folder=True,
                                     hint="set XDG_CACHE_HOME to a writable folder")
        if self.reference_stats is None:
            acts, cache = evaluator.reference_activations(
                self.inception, path, self.reference, inception_weights_id(config["inception_weights"]), self.device,
                self.chunk_size or 64, cache_dir)
            self.reference_stats = {name: evaluator.compute_statistics(acts[name]) for name in ("pool", "spatial")}
            evaluator.check_finite_statistics(self.reference_stats,
                                              f"--fid-ref {path}: the statistics of its Inception features")
            source = f"the statistics of its {len(self.reference):,} images (activation cache: {cache})"
        s = self.sampler
        cfg = f", CFG {s['cfg_scale']} on t in [{s['guidance_low']}, {s['guidance_high']}]" if s["cfg_scale"] > 1 \
            else ""
        run.log(f"In-training FID every {self.every} steps and at step {self.last_step}: {self.num_samples:,} EMA "
                f"samples ({s['mode']}, {s['num_steps']} steps{cfg}, {self.precision}, seed {s['global_seed']}) "
                f"against {path}, {source}")
        if self.random_inception:
            run.log(evaluator.RANDOM_WEIGHTS_WARNING)
        if self.fd is not None:
            self.fd_reference, fd_source = evaluator.fd_dinov2_reference(self.fd, path, self.reference,
                                                                         self.chunk_size or 64, cache_dir)
            run.log(f"FD-DINOv2 beside it, DINOv2 weights {self.fd.path}; reference statistics of "
                    f"{fd_source['num_images']:,} images (cache: {fd_source['cache']})")

    def __call__(self, run, step: int, ema: torch.nn.Module) -> None:
        """FID, sFID, IS of the EMA weights' samples (on every process; the main one computes and logs them), and
        the seconds they took: fid_seconds in all, fid_sample_seconds for the main process's own samples (generation
        and Inception); the rest is gathering and the metrics (two 2048 x 2048 matrix square roots)."""
        if not (step > 0 and (step % self.every == 0 or step == self.last_step)):
            return
        start = time.perf_counter()
        mine = list(range(self.rank, self.num_samples, self.world_size))
        indices: List[int] = []
        parts: Dict[str, List[np.ndarray]] = {name: [] for name in FEATURES + (("dinov2",) if self.fd else ())}
        with bitwise_scope(self.config["fid_bitwise"], self.device), precision_scope(self.precision) as autocast_dtype:
            for batch, images in generate_images(
                    ema, self.vae, mine, autocast_dtype=autocast_dtype, batch_size=self.batch_size,
                    chunk_size=self.chunk_size, progress=self.is_main,
                    desc=f"FID at step {step} ({self.world_size} proc)", **self.sampler):
                chunk = self.chunk_size or len(images)  # the Inception sees what the SiT and VAE saw
                for i in range(0, len(images), chunk):
                    feats = evaluator.inception_features(self.inception, images[i:i + chunk], self.device, True)
                    for name in FEATURES:
                        parts[name].append(feats[name])
                    if self.fd is not None:
                        parts["dinov2"].append(self.fd.features(images[i:i + chunk]))
                indices += batch
        sample_seconds = time.perf_counter() - start
        gathered = [(indices, parts)]  # every process's, in process order, on the main process
        if self.group is not None:
            gathered = [None] * self.world_size if self.is_main else None
            dist.gather_object((indices, parts), gathered, dst=0, group=self.group)
        if not self.is_main:
            return
        order = np.argsort(np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in gathered]), kind="stable")
        acts = {name: np.concatenate([a for _, p in gathered for a in p[name]])[order] for name in parts}
        if len(order) != self.num_samples:
            raise RuntimeError(f"in-training FID: gathered {len(order)} samples, expected {self.num_samples}")
        stats = {name: evaluator.compute_statistics(acts[name]) for name in ("pool", "spatial")}
        evaluator.check_finite_statistics(stats, f"in-training FID: the statistics of the {self.num_samples:,} samples")
        metrics = {"fid": evaluator.frechet_distance(*stats["pool"], *self.reference_stats["pool"]),
                   "sfid": evaluator.frechet_distance(*stats["spatial"], *self.reference_stats["spatial"]),
                   "inception_score": evaluator.inception_score(acts["probs"],
                                                                min(evaluator.IS_SPLIT_SIZE, self.num_samples))}
        if self.fd is not None:
            samples = fd_dinov2.statistics(acts["dinov2"])
            fd_dinov2.check_finite(samples, f"in-training FD-DINOv2: the {self.num_samples:,} samples")
            metrics["fd_dinov2"] = fd_dinov2.frechet_distance(*samples, *self.fd_reference)
        seconds = time.perf_counter() - start
        run.log_metrics({"step": step, **metrics, "fid_seconds": round(seconds, 3),
                         "fid_sample_seconds": round(sample_seconds, 3), "fid_num_samples": self.num_samples,
                         "fid_num_steps": self.sampler["num_steps"]})
        fd = f", FD-DINOv2 {metrics['fd_dinov2']:.4f}" if "fd_dinov2" in metrics else ""
        run.log(f"step {step}: FID {metrics['fid']:.4f}, sFID {metrics['sfid']:.4f}, IS "
                f"{metrics['inception_score']:.4f}{fd} ({self.num_samples:,} samples, {seconds:.0f} s)"
                + (" (RANDOM Inception weights: meaningless)" if self.random_inception else ""))
