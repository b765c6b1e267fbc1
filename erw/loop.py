"""The training loop both phases run, and what both build the same way before it: the training set, the teachers,
the SiT's arguments and Phase 2's warm start.

The loop calls the step (erw/step.py) and, beside it, the run's operations (operations/run.py): resume, health
checks, preemption and checkpoints. Exact resume: every step reseeds from (seed, step), every random draw belongs to
an image of the step's global batch (erw/batch_random.py) and the data order is a pure function of (seed, epoch),
so a resumed run repeats what an uninterrupted one does, on any number of processes. No step waits for the GPU:
losses, gradient norms and skipped updates stay on the device (StepHealth) until a log step or a checkpoint.
"""
import contextlib
import copy
import itertools
import math
import os
import signal
import time
from typing import Any, Dict, List, Optional, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from erw.data import LATENT_CHANNELS, VAE_DOWNSAMPLING, ImageLatentDataset, ResumableShardSampler
from erw.losses import Objective
from erw.precision import set_fp32_precision
from erw.samplers import GuidedVelocity, sample_ode
from erw.step import MixedPrecision, train_step
from erw.warm_start import load_warmup
from models.encoders import load_teachers
from models.vae import decode_latents, load_vae
from operations.checkpoint import read_weights
from operations.cli import InvalidInput, MissingInput, refusals
from operations.files import atomic_write
from operations.preemption import PREEMPTION_SIGNALS
from operations.run import Run
from operations.teacher_cache import TeacherCache, teachers_from_cache

# fp16's GradScaler skips a step per overflow and halves its scale each time: from the default 2^16 it needs ~20
# skips to reach any workable scale. More in a row means the gradients are broken, not the scale.
MAX_CONSECUTIVE_SKIPS = 50
PREFETCH_BATCHES = 4  # per loader worker: absorbs slow reads (a cold file system); --num-workers sets throughput


def aligns(config: Dict[str, Any]) -> bool:
    """Phase 1 always aligns; Phase 2 unless proj_coeff is 0 or there is no teacher (plain SiT)."""
    return config["enc_type"] is not None and (config["phase"] == "warmup" or config["proj_coeff"] > 0)


def training_set(config: Dict[str, Any]) -> ImageLatentDataset:
    """The training set (with the teacher cache when the run has one), checked against the config."""
    with refusals("--data-dir"):
        cache = TeacherCache(config["teacher_cache"]) if config["teacher_cache"] and aligns(config) else None
        dataset = ImageLatentDataset(config["data_dir"], load_images=aligns(config), teacher_cache=cache)
    if dataset.resolution != config["resolution"]:
        raise InvalidInput(f"{config['data_dir']} holds {dataset.resolution}px images but --resolution is "
                           f"{config['resolution']}")
    if dataset.num_classes > config["num_classes"]:
        raise InvalidInput(f"{config['data_dir']} has labels up to {dataset.num_classes - 1} but --num-classes is "
                           f"{config['num_classes']}")
    micro_batch = config["batch_size"] // config["gradient_accumulation_steps"]
    if len(dataset) < micro_batch:
        raise InvalidInput(f"{config['data_dir']} holds {len(dataset):,} items, fewer than one micro-batch of "
                           f"{micro_batch:,} (--batch-size / --gradient-accumulation-steps): lower --batch-size")
    return dataset


def training_teachers(config: Dict[str, Any], dataset: ImageLatentDataset, notes: List[str]) -> List[torch.nn.Module]:
    """The frozen teachers (on the CPU), the teacher cache's stand-ins once its identity is shown to be the run's, or
    [] when the run has no alignment term (then none is loaded)."""
    if not aligns(config):
        if config["phase"] == "warmup":
            raise InvalidInput("Phase 1 aligns with a teacher: --enc-type must name one")
        notes.append("No alignment term (proj_coeff = 0 or enc_type = none): no teacher loaded")
        return []
    if dataset.teacher_cache is not None:
        teachers, note = teachers_from_cache(dataset.teacher_cache, config, dataset)
        notes.append(note)
        return teachers
    with refusals("--enc-type/--enc-weights"):
        teachers = load_teachers(config["enc_type"], config["resolution"], config["enc_weights"])
    for teacher in teachers:
        notes.append(f"WARNING: teacher {teacher.name} has RANDOM weights: alignment targets are meaningless (tests "
                     "and demo only)" if teacher.name.startswith("random") else
                     f"Teacher {teacher.name}: {teacher.embed_dim}-wide tokens")
    return teachers


def sit_args(config: Dict[str, Any], teachers: Sequence[torch.nn.Module]) -> Dict[str, Any]:
    """create_sit's arguments, stored in every checkpoint so that sampling rebuilds the model. Phase 1 builds
    warmup_depth blocks with the projector after the last; Phase 2 every block, the projector after encoder_depth.
    The resolution must give whole patches, and the teachers' token grid must be the SiT's."""
    warmup = config["phase"] == "warmup"
    patch = int(config["model"].rsplit("/", 1)[1])
    if config["resolution"] % (VAE_DOWNSAMPLING * patch):
        raise InvalidInput(f"--resolution {config['resolution']} is not a multiple of {VAE_DOWNSAMPLING * patch}: "
                           f"{config['model']} needs whole {patch}x{patch} patches of the {VAE_DOWNSAMPLING}x smaller "
                           f"latent (e.g. 256 or 512)")
    tokens = (config["resolution"] // (VAE_DOWNSAMPLING * patch)) ** 2
    for teacher in teachers:
        if teacher.num_tokens != tokens:
            raise InvalidInput(f"teacher {teacher.name} gives {teacher.num_tokens} tokens per image at "
                               f"{config['resolution']} px, {config['model']} {tokens}: the alignment pairs them "
                               f"token by token, so choose a patch-2 SiT (one token per 16x16 pixels, as the teachers)")
    return {"model": config["model"], "input_size": config["resolution"] // VAE_DOWNSAMPLING,
            "in_channels": LATENT_CHANNELS, "num_classes": config["num_classes"], "cfg_prob": config["cfg_prob"],
            "encoder_depth": config["warmup_depth"] if warmup else config["encoder_depth"],
            "z_dims": [t.embed_dim for t in teachers], "qk_norm": config["qk_norm"], "use_rope": config["use_rope"],
            "built_depth": config["warmup_depth"] if warmup else None}


def warm_start(model: torch.nn.Module, path: str, weights: str = "model", start_layer: int = 0,
               expected_depth: Optional[int] = None, add_rope: bool = False) -> str:
    """Phase 1's embedders, blocks and projectors from the checkpoint `path` into `model` (erw/warm_start.py);
    returns a line for the log."""
    if not os.path.isfile(path):
        raise MissingInput(f"--warmup-ckpt {path} does not exist: run Phase 1 first (train_warmup.py with the same "
                           "--config), or pass --warmup-ckpt none for a baseline without warmup")
    source, args, info = read_weights(path, weights, flags_for_ours=False)
    with refusals("--warmup-ckpt"):
        summary = load_warmup(model, source, args, path, start_layer, expected_depth, add_rope)
    return f"{summary} Loaded its {weights} weights, of Phase-1 step {info['step']}."


class Hook(Protocol):
    """What fit calls: start(run) once, then hook(run, step, ema) after step 0 and after every optimizer step, on
    the main process, or on every process when `all_processes` (for collective work, e.g. the in-training FID)."""
    all_processes: bool

    def start(self, run: Run) -> None: ...

    def __call__(self, run: Run, step: int, ema: torch.nn.Module) -> None: ...


class SampleGrids:
    """At step 0, every `sample_grid_every` steps and at the last: samples/NNNNNNN.png from the EMA model, fixed
    noise and labels, Euler ODE. The VAE is loaded when the hook is made, so that a bad --vae stops the run before
    it trains."""
    all_processes = False

    def __init__(self, config: Dict[str, Any], latent_shape: Sequence[int]):
        self.every, self.last_step, self.num_steps = (config["sample_grid_every"], config["max_train_steps"],
                                                      config["sample_num_steps"])
        seed = torch.Generator().manual_seed(0)
        self.noise = torch.randn((config["sample_grid_size"], *latent_shape), generator=seed)
        self.labels = torch.arange(config["sample_grid_size"]) % config["num_classes"]
        with refusals("--vae"):
            self.vae = load_vae(config["vae"])

    def start(self, run: Run) -> None:
        self.vae = self.vae.to(run.device)

    def __call__(self, run: Run, step: int, ema: torch.nn.Module) -> None:
        if step % self.every and step != self.last_step:
            return
        latents = sample_ode(GuidedVelocity(ema), self.noise.to(run.device), self.labels.to(run.device),
                             self.num_steps)
        images = decode_latents(self.vae, latents.float()).cpu().numpy()
        cols = math.ceil(math.sqrt(len(images)))
        grid = np.zeros((math.ceil(len(images) / cols) * images.shape[1], cols * images.shape[2], 3), np.uint8)
        for i, image in enumerate(images):
            r, c = divmod(i, cols)
            grid[r * image.shape[0]:(r + 1) * image.shape[0], c * image.shape[1]:(c + 1) * image.shape[1]] = image
        path = os.path.join(run.samples_dir, f"{step:07d}.png")
        atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
        run.log_image("samples", grid, step)
        run.log(f"Saved sample grid {path}")


class StepHealth:
    """What went wrong since the last check, kept on the device so that a step never waits for the host: the first
    step with a non-finite loss, skipped updates (non-finite gradients) in all and the longest run of them in a
    row. `check` reads it with one host sync (and, with several processes, one all-reduce)."""

    NONE = 2 ** 62  # "no bad loss yet": larger than any step, so that the earliest bad step wins a min-reduce

    def __init__(self, device, skipped: int):
        self.first_bad_loss = torch.tensor(self.NONE, device=device)
        self.skipped = torch.tensor(skipped, device=device)
        self.in_a_row = torch.zeros((), dtype=torch.long, device=device)
        self.longest_run = torch.zeros((), dtype=torch.long, device=device)
        self.last_skipped = torch.zeros((), dtype=torch.long, device=device)

    # Python numbers enter as kernel arguments (clamp, masked_fill): a tensor made from one would be a host-to-device
    # copy, which waits for the GPU.
    def note(self, finite_loss: torch.Tensor, applied: torch.Tensor, step: int) -> None:
        self.first_bad_loss = torch.where(finite_loss, self.first_bad_loss, self.first_bad_loss.clamp(max=step))
        skipped = (~applied).long()
        self.skipped += skipped
        self.in_a_row = (self.in_a_row + 1) * skipped
        self.longest_run = torch.maximum(self.longest_run, self.in_a_row)
        self.last_skipped = self.last_skipped.masked_fill(~applied, step)

    def check(self, world_size: int) -> Dict[str, int]:
        """{first_bad_loss (NONE if none), skipped, longest_run, last_skipped}; the run counter restarts."""
        values = torch.stack([self.first_bad_loss, self.skipped, self.longest_run, self.last_skipped])
        if world_size > 1:  # a bad loss may be one process's; the update counters agree already
            dist.all_reduce(values, op=dist.ReduceOp.MIN)
        first_bad_loss, skipped, longest_run, last_skipped = values.tolist()
        self.longest_run = self.in_a_row.clone()
        return dict(first_bad_loss=first_bad_loss, skipped=skipped, longest_run=longest_run,
                    last_skipped=last_skipped)


def bad_items(run: Run, dataset: ImageLatentDataset, micro_batches: range, step: int) -> str:
    """Which items the global batch of `step` held (the data order is a pure function of (seed, epoch), so it is
    recomputed), listed in the log, and which of them hold a NaN or an infinity: --resume would replay them."""
    items = []
    for m, rank in itertools.product(micro_batches, range(run.world_size)):
        sampler = ResumableShardSampler(len(dataset), run.local_batch_size, rank, run.world_size,
                                        run.config["seed"], start_micro_batch=m)
        items += itertools.islice(sampler, run.local_batch_size)
    names = [f"{dataset.latent_files[i]} (item {i})" for i in items]
    run.log(f"step {step}'s batch, from {dataset.data_dir}: {', '.join(names)}")
    # Every float the item brings: the latent's moments, and the teacher cache's tokens where there is one.
    bad = [name for i, name in zip(items, names)
           if not all(torch.isfinite(x).all() for x in dataset[i] if x.is_floating_point())]
    if not bad:
        return (f"the step's {len(items)} items (listed in the log) hold finite values: the training diverged, not "
                "the data")
    return (f"{len(bad)} of the step's {len(items)} items (listed in the log) hold a NaN or an infinity: "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} in {dataset.data_dir}; remake them (a latent: "
            "delete it, rerun `preprocessing/dataset_tools.py encode`, then `pack` if the folder is packed) before "
            "--resume, which would train on them again")


def check_health(run: Run, health: StepHealth, step: int, checked_until: int, dataset, micro_batch: int,
                 logged_skips: int, scaler: torch.amp.GradScaler) -> int:
    """Stop on a non-finite loss (naming the data of its step) or on MAX_CONSECUTIVE_SKIPS skipped updates in a row;
    log skipped updates. Returns the skipped updates so far."""
    found = health.check(run.world_size)
    bad_step = found["first_bad_loss"]
    if bad_step != StepHealth.NONE:
        accumulation = run.config["gradient_accumulation_steps"]
        first = micro_batch - (step - bad_step + 1) * accumulation
        run.fail(f"non-finite loss at step {bad_step} (found at step {step}; its update was skipped); "
                 f"{bad_items(run, dataset, range(first, first + accumulation), bad_step)}; stopping")
    if found["longest_run"] >= MAX_CONSECUTIVE_SKIPS:
        run.fail(f"gradients were non-finite in {found['longest_run']} steps in a row (last: step "
                 f"{found['last_skipped']}); stopping")
    if found["skipped"] > logged_skips:
        scale = f"; fp16 loss scale now {scaler.get_scale():g}" if scaler.is_enabled() else ""
        run.log(f"steps {checked_until + 1}..{step}: {found['skipped'] - logged_skips} update(s) skipped for a "
                f"non-finite gradient (last at step {found['last_skipped']}); {found['skipped']} skipped so far{scale}")
    return found["skipped"]


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: a scheduler signals the whole process group, and a worker killed by SIGTERM would
    crash the loader before the main process could write its checkpoint."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def workers_stopped_at_exit(data_iter):
    """Stop the loader's workers however the loop ends: they ignore SIGTERM, so a traceback that kept the iterator
    alive would make multiprocessing's exit handler wait for them forever."""
    try:
        yield
    finally:
        if hasattr(data_iter, "_shutdown_workers"):  # absent with num_workers 0
            data_iter._shutdown_workers()


def compile_blocks(model: torch.nn.Module, teachers: Sequence[torch.nn.Module]) -> None:
    """torch.compile the transformer blocks in place: identical blocks share one graph (compile time does not grow
    with depth), and in place the state-dict keys stay as they are."""
    for block in model.blocks:
        block.compile()
    for teacher in (t for t in teachers if hasattr(t, "vit")):  # a teacher cache's stand-ins run no network
        for block in teacher.vit.blocks:
            block.compile()


def fit(run: Run, model: torch.nn.Module, model_args: Dict[str, Any], objective: Objective,
        dataset: ImageLatentDataset, teachers: Sequence[torch.nn.Module], hooks: Sequence[Hook] = ()
        ) -> Dict[str, Any]:
    """Train `model` for max_train_steps optimizer steps of `objective`; the run folder is released however it
    ends (a SIGKILL leaves the lock's record, which the next run reports). Returns {step, history, model, ema}."""
    try:
        return _fit(run, model, model_args, objective, dataset, teachers, hooks)
    finally:
        run.close()


def _fit(run: Run, model, model_args, objective, dataset, teachers, hooks) -> Dict[str, Any]:
    cfg, acc = run.config, run.accelerator
    if cfg["allow_tf32"]:
        set_fp32_precision("tf32")
    model.to(run.device)
    teachers = [teacher.to(run.device) for teacher in teachers]
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    # Fused AdamW: one kernel for all parameters, and the device-side skip of erw/step.py's apply_update.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["learning_rate"],
                                  betas=(cfg["adam_beta1"], cfg["adam_beta2"]), weight_decay=cfg["adam_weight_decay"],
                                  eps=cfg["adam_epsilon"], fused=True)
    precision = MixedPrecision(cfg["mixed_precision"], run.device)
    data_state = dataset.fingerprint()
    start = run.resume(model, ema, optimizer, precision, model_args, data_state)
    step, micro_batch, skipped = start["step"], start["micro_batch"], start["skipped"]
    run.log(f"Precision: {precision.describe()}")
    if cfg["compile"]:
        compile_blocks(model, teachers)
        run.log(f"torch.compile: the {len(model.blocks)} SiT blocks and the teachers' blocks, in place; the first "
                "step compiles, a minute or more")
    run.log(f"{model_args['model']} ({'full' if model_args['built_depth'] is None else 'truncated'}, "
            f"{len(model.blocks)} blocks): {sum(p.numel() for p in model.parameters()):,} parameters; "
            f"{len(dataset):,} training items; global batch {cfg['batch_size']} = {run.world_size} processes x "
            f"{run.local_batch_size} x {cfg['gradient_accumulation_steps']} accumulation")
    accumulation = cfg["gradient_accumulation_steps"]
    if accumulation > 1 and objective.align == "ntxent":
        run.log(f"Gradient accumulation {accumulation}: NT-Xent's negatives are the "
                f"{run.world_size * run.local_batch_size} images of one micro-batch, not the {cfg['batch_size']} "
                "of the optimizer step (the velocity and cosine losses are unchanged)")
    model = acc.prepare(model)
    workers = cfg["num_workers"]
    loader = DataLoader(dataset, batch_size=run.local_batch_size, drop_last=True, num_workers=workers,
                        sampler=ResumableShardSampler(len(dataset), run.local_batch_size, run.rank, run.world_size,
                                                      cfg["seed"], start_micro_batch=micro_batch),
                        pin_memory=run.device.type == "cuda", persistent_workers=workers > 0,
                        prefetch_factor=PREFETCH_BATCHES if workers else None,
                        worker_init_fn=ignore_preemption_signals if workers else None)
    run.start_trackers()
    hooks = [hook for hook in hooks if run.is_main or hook.all_processes]
    for hook in hooks:
        hook.start(run)
    if step == 0:
        for hook in hooks:
            hook(run, step, ema)

    health, checked_until = StepHealth(run.device, skipped), step
    history: List[Dict[str, float]] = []
    window_start, window_steps = time.perf_counter(), 0
    data_iter = iter(loader)
    progress = tqdm(total=cfg["max_train_steps"], initial=step, desc=f"{cfg['phase']} {cfg['exp_name']}",
                    disable=not run.is_main, dynamic_ncols=True)
    model.train()
    with run.preemption() as preemption, progress, workers_stopped_at_exit(data_iter):
        if preemption.requested():  # during start-up: nothing trained since the last checkpoint, nothing to save
            run.exit_preempted(f"Received {preemption.requested()} while starting: stopped before step {step + 1} "
                               "(nothing new to save)")
        while step < cfg["max_train_steps"]:
            with refusals():  # a bad item's error, raised in a loader worker or here
                batches = [next(data_iter) for _ in range(accumulation)]
            micro_batches = [[x.to(run.device, non_blocking=True) for x in batch] for batch in batches]
            logs, finite, grad_norm, applied = train_step(
                model, ema, optimizer, precision, objective, teachers, micro_batches, step, cfg["seed"],
                cfg["max_grad_norm"], cfg["ema_decay"], run.rank, run.world_size)
            step, micro_batch, window_steps = step + 1, micro_batch + accumulation, window_steps + 1
            health.note(finite, applied, step)
            progress.update(1)
            log_due = step % cfg["log_every"] == 0 or step == cfg["max_train_steps"]
            stop_signal = preemption.requested()
            save_due = step % cfg["checkpointing_steps"] == 0 or step == cfg["max_train_steps"] or stop_signal
            if log_due or save_due:
                skipped = check_health(run, health, step, checked_until, dataset, micro_batch, skipped,
                                       precision.scaler)
                checked_until = step
            if log_due:
                record = {k: acc.reduce(v.to(run.device).float(), "mean").item() for k, v in logs.items()}
                record.update(grad_norm=grad_norm.item(), lr=optimizer.param_groups[0]["lr"], skipped_steps=skipped,
                              images_per_sec=cfg["batch_size"] * window_steps / (time.perf_counter() - window_start),
                              step=step)
                history.append(record)
                run.log_metrics(record)
                progress.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "grad_norm") if k in record})
                run.log(f"step {step}: " + ", ".join(f"{k}={v:.5g}" for k, v in record.items() if k != "step"))
                window_start, window_steps = time.perf_counter(), 0
            if save_due:
                run.save({"model": acc.unwrap_model(model).state_dict(), "ema": ema.state_dict(),
                          "opt": optimizer.state_dict(), "scaler": precision.state_dict(), "model_args": model_args,
                          "skipped_steps": skipped,
                          "data_position": {"micro_batch": micro_batch, "world_size": run.world_size,
                                            "local_batch_size": run.local_batch_size, **data_state}}, step)
            if stop_signal:  # before the hooks: an in-training FID due now would outlast the grace period
                run.exit_preempted(f"Received {stop_signal}: stopped after step {step} and saved {run.last_good}")
            for hook in hooks:
                hook(run, step, ema)
    acc.wait_for_everyone()
    acc.end_training()
    return {"step": step, "history": history, "model": acc.unwrap_model(model), "ema": ema}
