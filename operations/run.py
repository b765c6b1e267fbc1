"""A training run's processes and experiment folder, which the loop (erw/loop.py) reaches through a few calls:
open_run, Run.resume, Run.stop_requested, Run.save, Run.log.

    exps/NAME/
        run.lock              held while the run lives (operations/lock.py)
        config.yaml           the resolved settings of the latest start
        config_history.yaml   every resume that changed a setting: what, from what, to what
        log.txt               the log (the console shows the same lines above the progress bar)
        metrics.jsonl         one JSON record per logged step; a resume drops the records past its step
        checkpoints/          operations/checkpoint.py's folder
        samples/              the sample grids
"""
import datetime
import json
import logging
import os
import signal
import threading
import weakref
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import yaml
from tqdm.auto import tqdm

from operations.checkpoint import (CHECKPOINT_FORMAT, LAST_CHECKPOINT, CheckpointWriteError, find_resume_checkpoint,
                                   keep_unreadable, load_state_dict_strict, numbered_checkpoint, numbered_checkpoints,
                                   write_checkpoint, write_failure_reason)
from operations.cli import FolderTaken, InvalidInput, check_folder_path, refusals
from operations.config import dump_config, resume_changes
from operations.files import atomic_write, remove_stale_temps
from operations.lock import FolderInUse, RunLock, describe_holder
from operations.preemption import EXIT_PREEMPTED, PREEMPTION_SIGNALS, TRAINING, early_preemption, report_exit_status

CONFIG_FILE = "config.yaml"
CONFIG_HISTORY_FILE = "config_history.yaml"
LOG_FILE = "log.txt"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
CHECKPOINTS_DIR = "checkpoints"


class TqdmHandler(logging.StreamHandler):
    """Console logging through tqdm.write, so that log lines and the progress bar never share a line."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's own contract: report a failed emit, never raise from it
            self.handleError(record)


def setup_logger(exp_dir: Optional[str]) -> logging.Logger:
    """Console + exp_dir/log.txt on the main process; silent elsewhere (exp_dir None)."""
    logger = logging.getLogger("erw")
    logger.handlers.clear()
    logger.propagate = False
    if exp_dir is None:
        logger.addHandler(logging.NullHandler())
        return logger
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    for handler in (TqdmHandler(), logging.FileHandler(os.path.join(exp_dir, LOG_FILE))):
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


def truncate_metrics(path: str, step: int) -> int:
    """Drop the records of metrics.jsonl past `step` (and a last line cut short by a kill); returns how many."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) < len(lines):
        atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))
    return len(lines) - len(kept)


def non_finite_tensors(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    return [name for name, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]


class Preemption:
    """Within `with`, SIGTERM / SIGUSR1 only set a flag that the loop reads after each optimizer step, so that a
    scheduler's warning ends the run at a step boundary with a checkpoint. With several processes the flags are
    combined over a CPU (gloo) group, which never waits for the GPU; enter it on every process."""

    def __init__(self):
        self.received: Optional[str] = early_preemption()  # a signal during start-up
        self._previous, self._group = {}, None

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
        return None if flag.item() == 0 else self.received or "a preemption signal (on another process)"


class Run:
    """One training run: accelerate's processes, the locked experiment folder, and with --resume the checkpoint
    it continues from (its settings already checked against the config). Made by open_run."""

    def __init__(self, config: Dict[str, Any]):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.config = config
        self.exp_dir = os.path.join(config["output_dir"], config["exp_name"])
        self.ckpt_dir = os.path.join(self.exp_dir, CHECKPOINTS_DIR)
        self.samples_dir = os.path.join(self.exp_dir, SAMPLES_DIR)
        if config["report_to"] == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")  # online only when the user asks for it
        self.accelerator = acc = Accelerator(
            cpu=not torch.cuda.is_available(),  # so that torchrun on CPUs forms a gloo group (tests, CI)
            mixed_precision="no",  # erw/step.py owns autocast and loss scaling, on the CPU too
            log_with=None if config["report_to"] == "none" else config["report_to"],
            project_config=ProjectConfiguration(project_dir=self.exp_dir,
                                                logging_dir=os.path.join(self.exp_dir, "logs")))
        self.device, self.is_main = acc.device, acc.is_main_process
        self.rank, self.world_size = acc.process_index, acc.num_processes
        self.local_batch_size, rem = divmod(config["batch_size"], acc.num_processes *
                                            config["gradient_accumulation_steps"])
        if rem or self.local_batch_size == 0:
            raise InvalidInput(f"--batch-size {config['batch_size']} is not divisible by processes "
                               f"({acc.num_processes}) x gradient accumulation steps "
                               f"({config['gradient_accumulation_steps']})")
        self.lock: Optional[RunLock] = None
        self.logger = logging.getLogger("erw")
        self.last_good: Optional[str] = None  # the newest checkpoint known to hold finite weights
        self.checkpoint: Optional[Dict[str, Any]] = None  # what --resume continues from, until resume() loads it
        self.config_history: List[Dict[str, Any]] = []

    # ------------------------------------------------------------------ opening the folder

    def _open(self) -> None:
        acc, config = self.accelerator, self.config
        refusal = None
        if self.is_main:
            try:
                self.lock = RunLock(self.exp_dir).acquire()
            except FolderInUse as error:
                refusal = error
        if acc.reduce(torch.tensor(float(refusal is not None), device=self.device), "sum").item() > 0:
            raise refusal or FolderInUse(f"{self.exp_dir} is in use by another run (the main process says which)")
        weakref.finalize(self, self.close)
        stale = 0
        if self.is_main:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            # Under the lock, before this run writes anything here: a temp file now is a killed run's leftover.
            stale = sum(remove_stale_temps(d) for d in (self.exp_dir, self.ckpt_dir, self.samples_dir))
        acc.wait_for_everyone()
        self.logger = setup_logger(self.exp_dir if self.is_main else None)
        if self.lock is not None and self.lock.taken_over:
            self.log(f"WARNING: took over {self.lock.path} from a run that ended without releasing it (killed): "
                     f"{describe_holder(self.lock.taken_over)}")
        if self.lock is not None and not self.lock.locks_work:
            self.log(f"WARNING: this file system refuses file locks; only the record in {self.lock.path} guards the "
                     "folder against a second run (docs/operations.md, \"File systems without working locks\")")
        if stale:
            self.log(f"Removed {stale} stale temp file(s) that an interrupted run left in {self.exp_dir}")
        unreadable = []
        if config["resume"]:
            path, ckpt, unreadable = find_resume_checkpoint(self.ckpt_dir, self.log)
            self._check_resume(path, ckpt)
        else:
            if config["resume_override"]:
                raise InvalidInput("--resume-override applies only together with --resume")
            existing = [os.path.basename(p) for _, p in numbered_checkpoints(self.ckpt_dir)]
            if os.path.isfile(os.path.join(self.ckpt_dir, LAST_CHECKPOINT)):
                existing.append(LAST_CHECKPOINT)
            if existing:
                raise FolderTaken(f"{self.exp_dir} already holds a run ({', '.join(existing[-3:])} in "
                                  f"{self.ckpt_dir}): pass --resume to continue it from its newest checkpoint, or "
                                  "choose another --exp-name")
        step = self.checkpoint["step"] if self.checkpoint else 0
        if self.is_main:
            dump_config(config, os.path.join(self.exp_dir, CONFIG_FILE))
            dropped = truncate_metrics(os.path.join(self.exp_dir, METRICS_FILE), step)
            if dropped:
                self.log(f"Dropped {dropped} record(s) past step {step} from {METRICS_FILE} (logged by the run that "
                         "was interrupted; this run logs those steps again)")
        acc.wait_for_everyone()
        if self.is_main:  # after every process has chosen its checkpoint, so that all choose among the same files
            keep_unreadable(unreadable, step, self.log)

    def _check_resume(self, path: str, ckpt: Dict[str, Any]) -> None:
        """Refuse settings that differ from those the checkpoint was trained with, unless --resume-override names
        them."""
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
        if (training or run_control) and self.is_main:
            self.config_history.append({
                "step": ckpt["step"], "resumed_from": path,
                "time": datetime.datetime.now().isoformat(timespec="seconds"),
                "changed": {k: [old, new] for k, (old, new) in {**run_control, **training}.items()},
                "overridden": sorted(training)})
            atomic_write(os.path.join(self.exp_dir, CONFIG_HISTORY_FILE),
                         lambda f: f.write(yaml.safe_dump(self.config_history, sort_keys=False).encode()))
        self.checkpoint, self.last_good = ckpt, path

    # ------------------------------------------------------------------ the loop's calls

    def resume(self, model, ema, optimizer, precision, model_args: Dict[str, Any], data: Dict[str, Any]
               ) -> Dict[str, int]:
        """Load the checkpoint --resume continues from into model, EMA, optimizer and loss scale (the optimizer
        takes this run's hyperparameters, so that config.yaml states what is used) and return where training goes
        on: {step, micro_batch, skipped}; zeros for a new run. `data`: the dataset's {dataset_len, items_sha256}, to
        be the data the checkpoint was trained on."""
        ckpt, cfg = self.checkpoint, self.config
        if ckpt is None:
            return {"step": 0, "micro_batch": 0, "skipped": 0}
        self.checkpoint = None  # the weights are about to live in the model; free the loaded copy
        if ckpt.get("model_args") != model_args:
            raise InvalidInput(f"--resume: {self.last_good} was written for model {ckpt.get('model_args')}, this "
                               f"run builds {model_args}")
        with refusals("--resume"):
            load_state_dict_strict(model, ckpt["model"], f"{self.last_good} [model]")
            load_state_dict_strict(ema, ckpt["ema"], f"{self.last_good} [ema]")
        optimizer.load_state_dict(ckpt["opt"])
        for group in optimizer.param_groups:
            group.update(lr=cfg["learning_rate"], betas=(cfg["adam_beta1"], cfg["adam_beta2"]),
                         weight_decay=cfg["adam_weight_decay"], eps=cfg["adam_epsilon"])
        precision.load_state_dict(ckpt.get("scaler"))
        position = ckpt["data_position"]
        changed = [f"{key} {position[key]!r} then, {data[key]!r} now" for key in data
                   if position.get(key, data[key]) != data[key]]
        if changed and "data_dir" not in cfg["resume_override"]:
            # The same folder name with other contents: another data order, other images under the same indices.
            raise InvalidInput(f"--resume: {self.last_good} was trained on other data than {cfg['data_dir']} holds "
                               f"({'; '.join(changed)}); restore the data, or pass --resume-override data_dir to "
                               "continue on it deliberately")
        micro_batch = position["micro_batch"]
        old_world, old_local = position["world_size"], position["local_batch_size"]
        if old_local * old_world != self.local_batch_size * self.world_size:
            # Continue after the same number of items of the data stream; the global batches differ from then on.
            consumed = micro_batch * old_world * old_local
            micro_batch = consumed // (self.world_size * self.local_batch_size)
            self.log(f"Global micro-batch {self.world_size} x {self.local_batch_size} (was {old_world} x "
                     f"{old_local}): the data order continues after item {consumed:,} of the stream")
        # The CPU generator only: every random number of a step comes from BatchRandom, reseeded per micro-batch.
        torch.set_rng_state(ckpt["rng"]["torch"])
        return {"step": ckpt["step"], "micro_batch": micro_batch, "skipped": ckpt["skipped_steps"]}

    def preemption(self) -> Preemption:
        """`with run.preemption() as stop:` ... `stop.requested()` after each step."""
        return Preemption()

    def exit_preempted(self, why: str) -> None:
        self.log(f"{why}; rerun the same command with --resume to continue (exit code {EXIT_PREEMPTED})")
        self.accelerator.end_training()
        raise SystemExit(EXIT_PREEMPTED)

    def save(self, state: Dict[str, Any], step: int) -> None:
        """checkpoints/NNNNNNN.pt and last.pt from `state` (model, ema, opt, scaler, data_position, skipped_steps,
        model_args; the weights unwrapped), on the main process. Refuses non-finite weights, so that every
        checkpoint on disk is a good one; a write that fails says why and which checkpoint is the last good one."""
        bad = non_finite_tensors(state["model"]) + [f"ema.{k}" for k in non_finite_tensors(state["ema"])]
        if bad:  # every process holds the same weights, so every process stops here
            self.fail(f"non-finite weights after step {step} ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''});"
                      " not saved")
        acc = self.accelerator
        acc.wait_for_everyone()
        path, failure = numbered_checkpoint(self.ckpt_dir, step), None
        if self.is_main:
            ckpt = {"format": CHECKPOINT_FORMAT, **state, "step": step, "rng": {"torch": torch.get_rng_state()},
                    "config": self.config, "config_history": self.config_history}
            try:
                write_checkpoint(self.ckpt_dir, step, ckpt)
            except (OSError, RuntimeError) as error:  # ENOSPC, EROFS, EDQUOT, ... (torch wraps them in RuntimeError)
                failure = error
        # Every process learns whether the main one could write, and all stop together (none waits in a barrier).
        if acc.reduce(torch.tensor(float(failure is not None), device=self.device), "sum").item() > 0:
            message = (f"could not write checkpoint {path}: "
                       f"{write_failure_reason(failure) if failure else 'the main process failed to write it'}. "
                       + (f"The last good checkpoint is {self.last_good}; it is intact" if self.last_good
                          else "No checkpoint of this run was written before"))
            self.log(f"ERROR: {message}")
            raise CheckpointWriteError(message) from failure
        self.last_good = path
        self.log(f"Saved checkpoint {path}")
        acc.wait_for_everyone()

    def log(self, message: str) -> None:
        self.logger.info(message)

    def fail(self, message: str) -> None:
        """Log `message` with where the last good checkpoint is, then raise FloatingPointError."""
        message += (f". The last good checkpoint is {self.last_good}" if self.last_good
                    else ". No checkpoint of this run was written yet")
        self.log(f"ERROR: {message}")
        raise FloatingPointError(message)

    def log_metrics(self, record: Dict[str, Any]) -> None:
        """Append `record` to metrics.jsonl (main process) and send it to the tracker at record["step"]."""
        if self.is_main:
            with open(os.path.join(self.exp_dir, METRICS_FILE), "a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_image(self, name: str, image, step: int) -> None:
        """uint8 (H, W, 3) image to the active tracker, if any (main process)."""
        if self.config["report_to"] == "wandb":
            import wandb
            self.accelerator.get_tracker("wandb").log({name: wandb.Image(image)}, step=step)
        elif self.config["report_to"] == "tensorboard":
            self.accelerator.get_tracker("tensorboard").writer.add_image(name, image, step, dataformats="HWC")

    def start_trackers(self) -> None:
        if self.is_main and self.config["report_to"] != "none":
            init = {"wandb": {"name": self.config["exp_name"]}} if self.config["report_to"] == "wandb" else {}
            self.accelerator.init_trackers(project_name="ERW", config=self.config, init_kwargs=init)

    def close(self) -> None:
        """The folder is free for the next run (idempotent)."""
        if self.lock is not None:
            self.lock.release()


def open_run(config: Dict[str, Any]) -> Run:
    """Start the processes, then lock and open the experiment folder; with --resume find the newest intact
    checkpoint and refuse settings that change what is trained. A refused run leaves the folder free at once."""
    check_folder_path(os.path.join(config["output_dir"], config["exp_name"]), "--output-dir/--exp-name")
    run = Run(config)
    try:
        run._open()
    except BaseException:
        run.close()
        raise
    return run
