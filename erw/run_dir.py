"""A training run's experiment folder, owned by one object (RunDir) for the run's lifetime:

    exps/NAME/
        run.lock              held while the run lives (erw/run_lock.py)
        config.yaml           the settings of the latest start, resolved (a resume rewrites it)
        config_history.yaml   every resume that changed a setting: what, from what, to what
        log.txt               the log (the console shows the same lines above the progress bar)
        metrics.jsonl         one JSON record per logged step; a resume drops the records past its step
        checkpoints/          erw/checkpoint.py's folder
        samples/              the sample grids (erw/sample_grid.py)

RunDir.open locks the folder, removes the temp files a killed run left, starts the log, and either returns the
checkpoint a --resume continues from or refuses a folder that already holds a run; RunDir.start then writes
config.yaml and cuts metrics.jsonl back to the step the run starts from. The main process does the file work; every
process learns the outcome, so that none waits in a barrier for a run that was refused.
"""
import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml
from tqdm.auto import tqdm

from erw.checkpoint import LAST_CHECKPOINT, find_resume_checkpoint, numbered_checkpoints
from erw.cli import FolderTaken
from erw.config import dump_config
from erw.files import atomic_write, remove_stale_temps
from erw.run_lock import FolderInUse, RunLock, describe_holder

CONFIG_FILE = "config.yaml"
CONFIG_HISTORY_FILE = "config_history.yaml"
LOG_FILE = "log.txt"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"


class TqdmHandler(logging.StreamHandler):
    """Console logging through tqdm.write, which clears the progress bar, prints the line and redraws the bar, so
    that log lines and the bar never share a line."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's own contract: report a failed emit, never raise from it
            self.handleError(record)


def setup_logger(exp_dir: Optional[str]) -> logging.Logger:
    """Console (tqdm-aware) + exp_dir/log.txt on the main process; silent elsewhere (exp_dir None)."""
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
    """Drop the records of `path` (metrics.jsonl) past `step`, and a last line cut short by a kill; returns how
    many lines were dropped. A resumed run then logs those steps once, not twice."""
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


class RunDir:
    """The experiment folder `path` of one run; `accelerator` says which process does the file work."""

    def __init__(self, path: str, accelerator):
        self.path = path
        self.ckpt_dir = os.path.join(path, "checkpoints")
        self.accelerator = accelerator
        self.lock: Optional[RunLock] = None
        self.logger = logging.getLogger("erw")

    def open(self, resume: bool) -> Optional[Tuple[str, Dict[str, Any]]]:
        """Lock, clean and start logging; with `resume` the newest intact checkpoint (path, contents), else None
        (a folder that holds a run is refused)."""
        self.lock = self._lock()
        try:
            return self._open(resume)
        except BaseException:
            self.release()
            raise

    def _lock(self) -> Optional[RunLock]:
        acc, lock, refusal = self.accelerator, None, None
        if acc.is_main_process:
            try:
                lock = RunLock(self.path).acquire()
            except FolderInUse as error:
                refusal = error
        if acc.reduce(torch.tensor(float(refusal is not None), device=acc.device), "sum").item() > 0:
            raise refusal or FolderInUse(f"{self.path} is in use by another run (the main process says which)")
        return lock

    def _open(self, resume: bool) -> Optional[Tuple[str, Dict[str, Any]]]:
        acc, stale = self.accelerator, 0
        if acc.is_main_process:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            # Under the lock, before this run writes anything here: a temp file now is a killed run's leftover.
            stale = sum(remove_stale_temps(d) for d in (self.path, self.ckpt_dir,
                                                         os.path.join(self.path, SAMPLES_DIR)))
        acc.wait_for_everyone()
        self.logger = setup_logger(self.path if acc.is_main_process else None)
        if self.lock is not None and self.lock.taken_over:
            self.log(f"WARNING: took over {self.lock.path} from a run that ended without releasing it (killed): "
                     f"{describe_holder(self.lock.taken_over)}")
        if self.lock is not None and not self.lock.locks_work:
            self.log(f"WARNING: this file system refuses file locks; only the record in {self.lock.path} "
                     "guards the folder against a second run (README, \"File systems without working locks\")")
        if stale:
            self.log(f"Removed {stale} stale temp file(s) that an interrupted run left in {self.path}")
        if resume:
            return find_resume_checkpoint(self.ckpt_dir, self.log)
        existing = [os.path.basename(p) for _, p in numbered_checkpoints(self.ckpt_dir)]
        if os.path.isfile(os.path.join(self.ckpt_dir, LAST_CHECKPOINT)):
            existing.append(LAST_CHECKPOINT)
        if existing:
            raise FolderTaken(
                f"{self.path} already holds a run ({', '.join(existing[-3:])} in {self.ckpt_dir}): pass "
                "--resume to continue it from its newest checkpoint, or choose another --exp-name")
        return None

    def start(self, config: Dict[str, Any], step: int) -> None:
        """config.yaml states what this run uses; metrics.jsonl keeps the records up to `step`, where it starts."""
        if self.accelerator.is_main_process:
            dump_config(config, os.path.join(self.path, CONFIG_FILE))
            dropped = truncate_metrics(os.path.join(self.path, METRICS_FILE), step)
            if dropped:
                self.log(f"Dropped {dropped} record(s) past step {step} from {METRICS_FILE} (logged by the run "
                         "that was interrupted; this run logs those steps again)")
        self.accelerator.wait_for_everyone()

    def write_config_history(self, history: List[Dict[str, Any]]) -> None:
        if self.accelerator.is_main_process:
            atomic_write(os.path.join(self.path, CONFIG_HISTORY_FILE),
                         lambda f: f.write(yaml.safe_dump(history, sort_keys=False).encode()))

    def log(self, message: str) -> None:
        self.logger.info(message)

    def append_metrics(self, record: Dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(os.path.join(self.path, METRICS_FILE), "a") as f:
                f.write(json.dumps(record) + "\n")

    def release(self) -> None:
        """The folder is free for the next run (idempotent)."""
        if self.lock is not None:
            self.lock.release()
