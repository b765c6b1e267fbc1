"""The one training loop both ERW phases run.

What differs between Phase 1 and Phase 2 (which blocks exist, input noise level, loss terms, lambda schedule,
sample grids) arrives as data: the model, an `Objective` (erw/losses.py) and optional step hooks. The loop owns
everything else: DDP and gradient accumulation (accelerate), mixed precision (erw/precision.py), fused AdamW,
clipping, EMA, logging, checkpoints (erw/checkpoint.py's format, in the run folder erw/run_dir.py owns) and exact
resume.

Exact resume: every micro-batch reseeds torch from (seed, optimizer step), every random draw belongs to an image of
the step's global batch (erw/batch_random.py) and the data order is a pure function of (seed, epoch), so a resumed
run repeats what an uninterrupted run would do, on any number of processes and with any split of the global batch
into accumulation steps; the checkpoint holds model, EMA, optimizer, loss scale, step, data position, the CPU RNG state
and the resolved config.

No step waits for the GPU: losses, gradient norms and skipped updates stay on the device (StepHealth) and are read
at log steps and before every checkpoint. What the loop guarantees besides:
- no update is ever applied from a non-finite gradient: it is skipped on the device and counted, as fp16's
  GradScaler does (which also lowers its scale); a non-finite loss, or MAX_CONSECUTIVE_SKIPS skips in a row, stops
  the run at the next check (a non-finite loss naming the items of its step and those that hold a NaN or an inf);
- a checkpoint never holds non-finite weights, and an error names the checkpoint that really is the last good one;
- --resume continues from the newest intact checkpoint and refuses settings that would change what is trained
  (erw/config.py: run_control), unless named in --resume-override; metrics.jsonl then drops records past that step;
- SIGTERM / SIGUSR1 (cluster preemption, erw/preemption.py) finish the current optimizer step, write a checkpoint
  and exit with EXIT_PREEMPTED; rerunning the same command with --resume continues bit for bit.
"""
import contextlib
import copy
import datetime
import itertools
import os
import signal
import threading
import time
import uuid
import weakref
from typing import Any, Dict, List, Optional, Protocol, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from erw.batch_random import BatchRandom, derive_seed
from erw.checkpoint import (CHECKPOINT_FORMAT, CheckpointWriteError, current_model_args, load_state_dict_strict,
                            numbered_checkpoint, write_checkpoint, write_failure_reason)
from erw.cli import InvalidInput, refusals_of_models
from erw.config import resume_changes
from erw.data import ResumableShardSampler, sample_latents
from erw.losses import Objective
from erw.precision import MixedPrecision, set_fp32_precision
from erw.preemption import EXIT_PREEMPTED, PREEMPTION_SIGNALS, TRAINING, early_preemption, report_exit_status
from erw.run_dir import CONFIG_HISTORY_FILE, RunDir

# fp16's GradScaler skips a step per overflow and halves its scale each time: from the default 2^16 it needs ~20
# skips to reach any workable scale. More in a row means the gradients are broken, not the scale.
MAX_CONSECUTIVE_SKIPS = 50
# Batches each loader worker keeps ready: absorbs slow reads (a cold file system) without adding throughput. What
# sets throughput is --num-workers: one worker decodes a 256-px PNG (compress level 0) in ~0.5 ms and loads its
# latent in ~0.07 ms, ~1000 items/s with file reads and collation; the fastest step we train, SiT-B/2 Phase 2 at
# 40% of an H100's bf16 peak, consumes ~2200 images/s per GPU (README: data loading), so 4 workers keep up.
PREFETCH_BATCHES = 4


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter (pos_embed is constant in both)."""
    ema_params = list(ema.parameters())
    model_params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)


class Hook(Protocol):
    """What Trainer.fit calls after step 0 and after every optimizer step (erw/sample_grid.py,
    evaluations/training_fid.py)."""
    # True: called on every process, for collective work (the in-training FID samples its share on each);
    # False: on the main process only.
    all_processes: bool

    def __call__(self, trainer: "Trainer", step: int, ema: torch.nn.Module) -> None: ...


class PreemptionHandler:
    """Within `with`, SIGTERM / SIGUSR1 only set a flag that the loop reads after each optimizer step, so a
    scheduler's warning signal ends the run at a step boundary with a checkpoint instead of killing it mid-step.
    With several processes the flags are combined over a CPU (gloo) group every step, which never waits for the
    GPU; enter the handler on every process (creating that group is collective)."""

    def __init__(self):
        self.received: Optional[str] = early_preemption()  # a signal during start-up (erw/preemption.py)
        self._previous = {}
        self._group = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        if dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        report_exit_status(TRAINING)  # launch.py: a death without a status from now on may lose a preemption save
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def requested(self) -> Optional[str]:
        """The signal's name if any process received one (all processes agree, so they stop at the same step)."""
        if self._group is None:
            return self.received
        flag = torch.tensor([int(self.received is not None)])
        dist.all_reduce(flag, group=self._group)
        if flag.item() == 0:
            return None
        return self.received or "a preemption signal (on another process)"


class StepHealth:
    """What went wrong since the last check, kept on the device so that a step never waits for the host: the
    first step with a non-finite loss, skipped updates (non-finite gradients) in total and the longest run of them
    in a row. `check` reads it with one host sync (and, with several processes, one all-reduce); the loop checks at
    log steps, before every checkpoint and at the end."""

    NONE = 2 ** 62  # "no bad loss yet": larger than any step, so that the earliest bad step wins a min-reduce

    def __init__(self, device, skipped: int):
        self.device = device
        self.first_bad_loss = torch.tensor(self.NONE, device=device)
        self.skipped = torch.tensor(skipped, device=device)
        self.in_a_row = torch.zeros((), dtype=torch.long, device=device)
        self.longest_run = torch.zeros((), dtype=torch.long, device=device)
        self.last_skipped = torch.zeros((), dtype=torch.long, device=device)

    # Python numbers enter as kernel arguments (clamp, masked_fill): a tensor made from one would be a host-to-device
    # copy, which waits for the GPU.
    def note_loss(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_loss = torch.where(bad, self.first_bad_loss.clamp(max=step), self.first_bad_loss)

    def note_update(self, applied: torch.Tensor, step: int) -> None:
        skipped = (~applied).long()
        self.skipped += skipped
        self.in_a_row = (self.in_a_row + 1) * skipped
        self.longest_run = torch.maximum(self.longest_run, self.in_a_row)
        self.last_skipped = self.last_skipped.masked_fill(~applied, step)

    def check(self, accelerator) -> Dict[str, int]:
        """{first_bad_loss (NONE if none), skipped, longest_run, last_skipped}; the run counter restarts."""
        values = torch.stack([self.first_bad_loss, self.skipped, self.longest_run, self.last_skipped])
        if accelerator.num_processes > 1:  # a bad loss may be one process's; the update counters agree already
            dist.all_reduce(values, op=dist.ReduceOp.MIN)
        first_bad_loss, skipped, longest_run, last_skipped = values.tolist()
        self.longest_run = self.in_a_row.clone()
        return dict(first_bad_loss=first_bad_loss, skipped=skipped, longest_run=longest_run,
                    last_skipped=last_skipped)


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: a scheduler signals the whole process group, and a worker killed by SIGTERM
    would crash the loader before the main process could write its checkpoint."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def workers_stopped_at_exit(data_iter):
    """Stop the DataLoader's workers when the loop ends, however it ends. They ignore SIGTERM, so if an error's
    traceback kept the iterator alive, multiprocessing's exit handler could not terminate them and would wait
    forever."""
    try:
        yield
    finally:
        shutdown = getattr(data_iter, "_shutdown_workers", None)  # absent with num_workers 0
        if shutdown is not None:
            shutdown()


def non_finite_tensors(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [name for name, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]


class Trainer:
    """Sets up accelerate and the run folder (RunDir) for a resolved config, and checks the checkpoint a --resume
    continues from against it; `fit` runs the loop."""

    def __init__(self, config: Dict[str, Any]):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.config = config
        self.exp_dir = os.path.join(config["output_dir"], config["exp_name"])
        self.ckpt_dir = os.path.join(self.exp_dir, "checkpoints")
        if config["report_to"] == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")  # online only when the user asks for it
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # so that torchrun on CPUs forms a gloo group (tests, CI)
            gradient_accumulation_steps=config["gradient_accumulation_steps"],
            mixed_precision="no",  # erw/precision.py owns autocast and loss scaling, on the CPU too
            log_with=None if config["report_to"] == "none" else config["report_to"],
            project_config=ProjectConfiguration(project_dir=self.exp_dir,
                                                logging_dir=os.path.join(self.exp_dir, "logs")),
        )
        acc = self.accelerator
        per_process, rem = divmod(config["batch_size"], acc.num_processes * config["gradient_accumulation_steps"])
        if rem or per_process == 0:
            raise InvalidInput(f"--batch-size {config['batch_size']} is not divisible by processes "
                               f"({acc.num_processes}) x gradient accumulation steps "
                               f"({config['gradient_accumulation_steps']})")
        self.local_batch_size = per_process
        if config["allow_tf32"]:
            set_fp32_precision("tf32")
        self.run_dir = RunDir(self.exp_dir, acc)
        resume_payload = self.run_dir.open(resume=config["resume"])
        weakref.finalize(self, self.run_dir.release)  # also at interpreter exit; fit() releases it when it ends
        try:
            self.logger = self.run_dir.logger
            self.device = acc.device
            self.precision = MixedPrecision(config["mixed_precision"], self.device)
            self.last_good: Optional[str] = None  # the newest checkpoint known to hold finite weights
            self.config_history: List[Dict[str, Any]] = []
            self.resume_from: Optional[Dict[str, Any]] = None
            if resume_payload is not None:
                self._check_resume(*resume_payload)
            elif config["resume_override"]:
                raise InvalidInput("--resume-override applies only together with --resume")
            self.run_dir.start(config, self.resume_from["step"] if self.resume_from else 0)
        except BaseException:  # a refused resume, say: the folder is free again at once
            self.run_dir.release()
            raise

    def _check_resume(self, path: str, ckpt: Dict[str, Any]) -> None:
        """Refuse settings that differ from the ones the checkpoint to continue from was trained with, unless
        --resume-override names them. Sets resume_from, last_good and config_history."""
        cfg = self.config
        stored = ckpt.get("config") or {}
        if stored.get("phase") not in (None, cfg["phase"]):
            raise InvalidInput(f"--resume: {path} is a {stored['phase']} checkpoint; this is the {cfg['phase']} "
                               "phase (give each phase its own --exp-name)")
        if ckpt["step"] > cfg["max_train_steps"]:
            # Doing nothing and exiting 0 would leave config.yaml saying a target the run is already past.
            raise InvalidInput(f"--resume: {path} is at step {ckpt['step']:,}, past --max-train-steps "
                               f"{cfg['max_train_steps']:,}: there is nothing to train. Pass --max-train-steps above "
                               f"{ckpt['step']:,} to go on (the run's files are left as they are)")
        training, run_control = resume_changes(stored, cfg)
        refused = {k: v for k, v in training.items() if k not in cfg["resume_override"]}
        if refused:
            raise InvalidInput(
                f"--resume: {path} was trained with other settings:\n" +
                "".join(f"  {k}: {old!r} in the checkpoint, {new!r} now\n" for k, (old, new) in refused.items()) +
                "These change what is trained. Restore them, or pass --resume-override "
                f"{','.join(refused)} to change them deliberately (recorded in {CONFIG_HISTORY_FILE}).")
        self.log(f"Resuming from {path} (step {ckpt['step']}), the newest intact checkpoint in {self.ckpt_dir}")
        for kind, changes in (("run-control setting", run_control), ("OVERRIDDEN training setting", training)):
            for k, (old, new) in changes.items():
                self.log(f"{kind} {k}: {old!r} -> {new!r}")
        self.config_history = list(ckpt.get("config_history") or [])
        if training or run_control:
            self.config_history.append({
                "step": ckpt["step"], "resumed_from": path,
                "time": datetime.datetime.now().isoformat(timespec="seconds"),
                "changed": {k: [old, new] for k, (old, new) in {**run_control, **training}.items()},
                "overridden": sorted(training)})
            self.run_dir.write_config_history(self.config_history)
        self.resume_from, self.last_good = ckpt, path

    def log(self, message: str) -> None:
        self.run_dir.log(message)

    def fail(self, message: str) -> None:
        """Log `message` with where the last good checkpoint is (to log.txt too), then raise FloatingPointError."""
        message += (f". The last good checkpoint is {self.last_good}" if self.last_good
                    else ". No checkpoint of this run was written yet")
        self.log(f"ERROR: {message}")
        raise FloatingPointError(message)

    def log_metrics(self, record: Dict[str, Any]) -> None:
        """Append `record` to metrics.jsonl (main process) and send its values to the tracker at record["step"]."""
        self.run_dir.append_metrics(record)
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def _run_hooks(self, hooks: List["Hook"], step: int, ema: torch.nn.Module) -> None:
        """Each hook on the main process, or on every process if its `all_processes` says so. A hook decides itself,
        in Python, whether it is due, so a step on which none is due never waits for the GPU."""
        for hook in hooks:
            if self.accelerator.is_main_process or hook.all_processes:
                hook(self, step, ema)

    def log_image(self, name: str, image, step: int) -> None:
        """uint8 (H, W, 3) image to the active tracker, if any (main process)."""
        report_to = self.config["report_to"]
        if report_to == "wandb":
            import wandb
            self.accelerator.get_tracker("wandb").log({name: wandb.Image(image)}, step=step)
        elif report_to == "tensorboard":
            self.accelerator.get_tracker("tensorboard").writer.add_image(name, image, step, dataformats="HWC")

    def _load_resume_state(self, model, ema, optimizer, model_args, dataset) -> Tuple[int, int, int]:
        """Load resume_from into model, EMA, optimizer and loss scaler; returns (step, micro-batch, skipped
        steps). The optimizer takes this run's hyperparameters, so that config.yaml states what is used."""
        cfg, acc, ckpt = self.config, self.accelerator, self.resume_from
        if current_model_args(ckpt.get("model_args")) != model_args:
            raise InvalidInput(f"--resume: {self.last_good} was written for model {ckpt.get('model_args')}, "
                               f"this run builds {model_args}")
        with refusals_of_models("--resume"):
            load_state_dict_strict(model, ckpt["model"], f"{self.last_good} [model]")
            load_state_dict_strict(ema, ckpt["ema"], f"{self.last_good} [ema]")
        optimizer.load_state_dict(ckpt["opt"])
        for group in optimizer.param_groups:
            group.update(lr=cfg["learning_rate"], betas=(cfg["adam_beta1"], cfg["adam_beta2"]),
                         weight_decay=cfg["adam_weight_decay"], eps=cfg["adam_epsilon"])
        self.precision.load_state_dict(ckpt.get("scaler"))
        position = ckpt["data_position"]
        if position.get("dataset_len", len(dataset)) != len(dataset) and "data_dir" not in cfg["resume_override"]:
            # The same folder name with other contents: the data order (a permutation of the items) changes.
            raise InvalidInput(f"--resume: {self.last_good} was trained on {position['dataset_len']:,} items, but "
                               f"{cfg['data_dir']} now holds {len(dataset):,}; restore the data, or pass "
                               "--resume-override data_dir to continue on it deliberately")
        micro_batch = position["micro_batch"]
        old_world = position.get("world_size", acc.num_processes)
        old_local = position.get("local_batch_size", self.local_batch_size)
        if old_local * old_world != self.local_batch_size * acc.num_processes:
            # Continue after the same number of items of the data stream; the global batches differ from then on.
            consumed = micro_batch * old_world * old_local
            micro_batch = consumed // (acc.num_processes * self.local_batch_size)
            self.log(f"Global micro-batch {acc.num_processes} x {self.local_batch_size} (was {old_world} x "
                     f"{old_local}): the data order continues after item {consumed:,} of the stream")
        # The CPU generator only; per-device CUDA generators are not restored (checkpoints before this format held
        # one per GPU of the saving machine, which fails on a machine with fewer): no draw of the loop uses them,
        # every random number of a step comes from BatchRandom, reseeded per micro-batch.
        torch.set_rng_state(ckpt["rng"]["torch"])
        return ckpt["step"], micro_batch, ckpt.get("skipped_steps", 0)

    def _check_health(self, health: StepHealth, step: int, checked_until: int, dataset, micro_batch: int) -> None:
        """Read what the steps since `checked_until` left on the device; stop on a non-finite loss (naming the data
        of its step, `micro_batch` being where the data stream is after `step`) or on MAX_CONSECUTIVE_SKIPS skipped
        updates in a row, and log skipped updates."""
        found = health.check(self.accelerator)
        bad_step = found["first_bad_loss"]
        if bad_step != StepHealth.NONE:
            accumulation = self.config["gradient_accumulation_steps"]
            first = micro_batch - (step - bad_step + 1) * accumulation
            self.fail(f"non-finite loss at step {bad_step} (found at step {step}; its update was skipped); "
                      f"{self._check_batch(dataset, range(first, first + accumulation), bad_step)}; stopping")
        if found["longest_run"] >= MAX_CONSECUTIVE_SKIPS:
            self.fail(f"gradients were non-finite in {found['longest_run']} steps in a row (last: step "
                      f"{found['last_skipped']}); stopping")
        new = found["skipped"] - self._skipped_logged
        if new:
            scaler = self.precision.scaler
            scale = f"; fp16 loss scale now {scaler.get_scale():g}" if scaler.is_enabled() else ""
            self.log(f"steps {checked_until + 1}..{step}: {new} update(s) skipped for a non-finite gradient (last at "
                     f"step {found['last_skipped']}); {found['skipped']} skipped so far{scale}")
        self._skipped_logged = found["skipped"]

    def _check_batch(self, dataset, micro_batches: range, step: int) -> str:
        """Which items the global batch of `step` held (the data order is a pure function of (seed, epoch), so it is
        recomputed), listed in the log, and which of them hold a NaN or an infinity: --resume would replay them."""
        acc, items = self.accelerator, []
        for m, rank in itertools.product(micro_batches, range(acc.num_processes)):
            sampler = ResumableShardSampler(len(dataset), self.local_batch_size, rank, acc.num_processes,
                                            self.config["seed"], start_micro_batch=m)
            items += itertools.islice(sampler, self.local_batch_size)
        names = [f"{dataset.latent_files[i]} (item {i})" for i in items]
        self.log(f"step {step}'s batch, from {dataset.data_dir}: {', '.join(names)}")
        # Every float the item brings: the latent's moments, and the teacher cache's tokens where there is one.
        bad = [name for i, name in zip(items, names)
               if not all(torch.isfinite(x).all() for x in dataset[i] if x.is_floating_point())]
        if not bad:
            return (f"the step's {len(items)} items (listed in the log) hold finite values: the training diverged, "
                    "not the data")
        return (f"{len(bad)} of the step's {len(items)} items (listed in the log) hold a NaN or an infinity: "
                f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} in {dataset.data_dir}; remake them (a latent: "
                "delete it, rerun `preprocessing/dataset_tools.py encode`, then `pack` if the folder is packed) "
                "before --resume, which would train on them again")

    def _apply_update(self, optimizer, applied: torch.Tensor) -> None:
        """One AdamW step, or none where `applied` is False, decided on the device: fused AdamW skips its update (and
        its step count) when `found_inf` is set, which is how GradScaler skips fp16 overflows without a host sync."""
        scaler = self.precision.scaler
        if scaler.is_enabled():
            scaler.step(optimizer)  # found_inf from its own unscale_: the same non-finite gradients
            scaler.update()
            return
        optimizer.grad_scale, optimizer.found_inf = None, (~applied).float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf

    def fit(self, model: torch.nn.Module, model_args: Dict[str, Any], objective: Objective, dataset,
            teachers: List[torch.nn.Module], hooks: Optional[List[Hook]] = None) -> Dict[str, Any]:
        """Train `model` for config["max_train_steps"] optimizer steps. `hooks` are called as
        hook(trainer, step, ema) after step 0 and every optimizer step (see _run_hooks). The run folder is
        released when it ends, however it ends (a SIGKILL leaves the lock's record, which the next run reports)."""
        try:
            return self._fit(model, model_args, objective, dataset, teachers, hooks)
        finally:
            self.run_dir.release()

    def _fit(self, model: torch.nn.Module, model_args: Dict[str, Any], objective: Objective, dataset,
             teachers: List[torch.nn.Module], hooks: Optional[List[Hook]]) -> Dict[str, Any]:
        cfg, acc, precision = self.config, self.accelerator, self.precision
        hooks = hooks or []
        model.to(self.device)
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        # Fused AdamW: one kernel for all parameters, and the device-side skip _apply_update relies on.
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["learning_rate"],
                                      betas=(cfg["adam_beta1"], cfg["adam_beta2"]),
                                      weight_decay=cfg["adam_weight_decay"], eps=cfg["adam_epsilon"], fused=True)
        # 0 = no clipping (clip_grad_norm_ with 0 would zero every gradient); the norm is still computed and logged.
        max_grad_norm = cfg["max_grad_norm"] or float("inf")
        step, micro_batch, skipped = 0, 0, 0
        if self.resume_from is not None:
            step, micro_batch, skipped = self._load_resume_state(model, ema, optimizer, model_args, dataset)
            self.resume_from = None  # the weights now live in the model; free the loaded copy
        self.log(f"Precision: {precision.describe()}")
        if cfg["compile"]:
            compile_blocks(model, teachers)
            self.log(f"torch.compile: the {len(model.blocks)} SiT blocks and the teachers' blocks, in place (keys "
                     "unchanged); the first step compiles, a minute or more")
        model = acc.prepare(model)

        sampler = ResumableShardSampler(len(dataset), self.local_batch_size, acc.process_index, acc.num_processes,
                                        cfg["seed"], start_micro_batch=micro_batch)
        loader = DataLoader(dataset, batch_size=self.local_batch_size, sampler=sampler, drop_last=True,
                            num_workers=cfg["num_workers"], pin_memory=self.device.type == "cuda",
                            persistent_workers=cfg["num_workers"] > 0,
                            prefetch_factor=PREFETCH_BATCHES if cfg["num_workers"] > 0 else None,
                            worker_init_fn=ignore_preemption_signals if cfg["num_workers"] > 0 else None)
        if acc.is_main_process:
            unwrapped = acc.unwrap_model(model)
            n_params = sum(p.numel() for p in unwrapped.parameters())
            built = "full" if model_args["built_depth"] is None else f"truncated to {len(unwrapped.blocks)} blocks"
            self.log(f"{model_args['model']} ({built}): {n_params:,} parameters; {len(dataset):,} training items; "
                     f"global batch {cfg['batch_size']} = {acc.num_processes} processes x {self.local_batch_size} "
                     f"x {cfg['gradient_accumulation_steps']} accumulation")
            if cfg["report_to"] != "none":
                acc.init_trackers(project_name="ERW", config=cfg,
                                  init_kwargs=({"wandb": {"name": cfg["exp_name"]}} if cfg["report_to"] == "wandb"
                                               else {}))
        if step == 0:
            self._run_hooks(hooks, step, ema)

        state = dict(model=model, ema=ema, optimizer=optimizer, model_args=model_args, dataset_len=len(dataset))
        progress = tqdm(total=cfg["max_train_steps"], initial=step, desc=f"{cfg['phase']} {cfg['exp_name']}",
                        disable=not acc.is_main_process, dynamic_ncols=True)
        accumulation = cfg["gradient_accumulation_steps"]
        if accumulation > 1 and objective.align == "ntxent":
            self.log(f"Gradient accumulation {accumulation}: NT-Xent's negatives are the "
                     f"{acc.num_processes * self.local_batch_size} images of one micro-batch, not the "
                     f"{cfg['batch_size']} of the optimizer step (the velocity and cosine losses are unchanged)")
        accumulated = 0  # micro-batches of this optimizer step so far
        health, self._skipped_logged, checked_until = StepHealth(self.device, skipped), skipped, step
        data_iter = iter(loader)
        window_start, window_steps = time.perf_counter(), 0
        history: List[Dict[str, float]] = []
        logs: Dict[str, torch.Tensor] = {}  # the current optimizer step's values, summed over its micro-batches
        model.train()
        with PreemptionHandler() as preemption, progress, workers_stopped_at_exit(data_iter):
            stop_signal = preemption.requested()
            if stop_signal:  # during start-up: nothing trained since the last checkpoint, nothing to save
                self.log(f"Received {stop_signal} while starting: stopped before step {step + 1} (nothing new to "
                         f"save); rerun the same command with --resume to continue (exit code {EXIT_PREEMPTED})")
                acc.end_training()
                raise SystemExit(EXIT_PREEMPTED)
            while step < cfg["max_train_steps"]:
                images, moments, labels = next(data_iter)
                # The same seed on every process and every micro-batch of the step: each draws the step's whole
                # global batch and keeps its own rows (erw/batch_random.py).
                torch.manual_seed(derive_seed(cfg["seed"], step))
                rng = BatchRandom(acc.process_index, acc.num_processes, accumulated, accumulation)
                images, moments, labels = (x.to(self.device, non_blocking=True) for x in (images, moments, labels))
                latents = sample_latents(moments, rng=rng)
                with torch.no_grad(), precision.autocast():
                    teacher_tokens = [teacher(images) for teacher in teachers]
                with acc.accumulate(model):
                    with precision.autocast():
                        loss, micro_logs = objective(model, latents, labels, teacher_tokens, step, rng)
                    # The step's values are the means over its micro-batches, as its loss is: kept on the device.
                    scaled = {k: v / accumulation for k, v in micro_logs.items()}
                    logs = scaled if accumulated == 0 else {k: logs[k] + v for k, v in scaled.items()}
                    health.note_loss(loss, step + 1)
                    precision.scaler.scale(loss / accumulation).backward()
                    if acc.sync_gradients:
                        precision.scaler.unscale_(optimizer)
                        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                        applied = torch.isfinite(grad_norm)
                        self._apply_update(optimizer, applied)
                        health.note_update(applied, step + 1)
                        optimizer.zero_grad(set_to_none=True)
                micro_batch += 1
                accumulated += 1
                if not acc.sync_gradients:
                    continue
                accumulated = 0
                update_ema(ema, acc.unwrap_model(model), cfg["ema_decay"])
                step += 1
                window_steps += 1
                progress.update(1)
                log_due = step % cfg["log_every"] == 0 or step == cfg["max_train_steps"]
                stop_signal = preemption.requested()
                save_due = step % cfg["checkpointing_steps"] == 0 or step == cfg["max_train_steps"] or stop_signal
                if log_due or save_due:
                    self._check_health(health, step, checked_until, dataset, micro_batch)
                    checked_until = step
                if log_due:
                    elapsed = time.perf_counter() - window_start
                    record = {k: acc.reduce(v.to(self.device).float(), "mean").item() for k, v in logs.items()}
                    record.update(grad_norm=grad_norm.item(), lr=optimizer.param_groups[0]["lr"],
                                  skipped_steps=self._skipped_logged,
                                  images_per_sec=cfg["batch_size"] * window_steps / elapsed, step=step)
                    history.append(record)
                    self.log_metrics(record)
                    progress.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "grad_norm") if k in record})
                    self.log(f"step {step}: " + ", ".join(f"{k}={v:.5g}" for k, v in record.items() if k != "step"))
                    window_start, window_steps = time.perf_counter(), 0
                if save_due:
                    self.save(state, step, micro_batch, self._skipped_logged)
                if stop_signal:  # before the hooks: an in-training FID due now would outlast the grace period
                    self.log(f"Received {stop_signal}: stopped after step {step} and saved {self.last_good}; rerun "
                             f"the same command with --resume to continue (exit code {EXIT_PREEMPTED})")
                    acc.end_training()
                    raise SystemExit(EXIT_PREEMPTED)
                self._run_hooks(hooks, step, ema)
        acc.wait_for_everyone()
        acc.end_training()
        return {"step": step, "history": history, "model": acc.unwrap_model(model), "ema": ema}

    def save(self, state: Dict[str, Any], step: int, micro_batch: int, skipped: int) -> None:
        """checkpoints/NNNNNNN.pt and last.pt (a hard link to it, atomically replaced), main process only.
        Refuses non-finite weights, so that every checkpoint on disk is a good one."""
        acc = self.accelerator
        model_state = acc.unwrap_model(state["model"]).state_dict()
        ema_state = state["ema"].state_dict()
        bad = non_finite_tensors(model_state) + [f"ema.{k}" for k in non_finite_tensors(ema_state)]
        if bad:  # every process holds the same weights, so every process stops here
            self.fail(f"non-finite weights after step {step} ({', '.join(bad[:5])}"
                      f"{' ...' if len(bad) > 5 else ''}); not saved")
        acc.wait_for_everyone()
        path = numbered_checkpoint(self.ckpt_dir, step)
        failure = None
        if acc.is_main_process:
            try:
                self._write_checkpoint(state, model_state, ema_state, step, micro_batch, skipped, path)
            except (OSError, RuntimeError) as error:  # ENOSPC, EROFS, EDQUOT, ... (torch wraps them in RuntimeError)
                failure = error
        # Every process learns whether the main one could write, and all stop together (none waits in a barrier).
        failed = acc.reduce(torch.tensor(float(failure is not None), device=self.device), "sum").item() > 0
        if failed:
            message = (f"could not write checkpoint {path}: "
                       f"{write_failure_reason(failure) if failure else 'the main process failed to write it'}. "
                       + (f"The last good checkpoint is {self.last_good}; it is intact" if self.last_good
                          else "No checkpoint of this run was written before"))
            self.log(f"ERROR: {message}")
            raise CheckpointWriteError(message) from failure
        self.last_good = path
        acc.wait_for_everyone()

    def _write_checkpoint(self, state: Dict[str, Any], model_state: Dict[str, torch.Tensor],
                          ema_state: Dict[str, torch.Tensor], step: int, micro_batch: int, skipped: int,
                          path: str) -> None:
        """This run's state as a checkpoint in the run folder (erw/checkpoint.py's format; main process)."""
        acc = self.accelerator
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            # Unique per save: the id sample folders of these weights are known by (erw/sample_run.py).
            "checkpoint_id": uuid.uuid4().hex,
            "model": model_state,
            "ema": ema_state,
            "opt": state["optimizer"].state_dict(),
            "scaler": self.precision.state_dict(),
            "step": step,
            "skipped_steps": skipped,
            "data_position": {"micro_batch": micro_batch, "world_size": acc.num_processes,
                              "local_batch_size": self.local_batch_size, "dataset_len": state["dataset_len"]},
            "rng": {"torch": torch.get_rng_state()},
            "config": self.config,
            "config_history": self.config_history,
            "model_args": state["model_args"],
        }
        write_checkpoint(self.ckpt_dir, step, ckpt)
        self.log(f"Saved checkpoint {path}")


def compile_blocks(model: torch.nn.Module, teachers: List[torch.nn.Module]) -> None:
    """torch.compile the transformer blocks in place ("regional" compilation): the blocks hold nearly all of the
    FLOPs, identical blocks share one compiled graph (compile time does not grow with depth), and compiling in
    place leaves the state-dict keys as they are (wrapping adds "_orig_mod.")."""
    for block in model.blocks:
        block.compile()
    for teacher in (t for t in teachers if hasattr(t, "vit")):  # a teacher cache's stand-ins run no network
        for block in teacher.vit.blocks:
            block.compile()
