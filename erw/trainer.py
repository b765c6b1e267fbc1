"""The one training loop both ERW phases run.

What differs between Phase 1 and Phase 2 (which blocks exist, input noise level, loss terms, lambda schedule,
sample grids) arrives as data: the model, an `Objective` (erw/losses.py) and optional step hooks. The loop owns
everything else: accelerate (DDP, mixed precision, gradient accumulation), AdamW, clipping, EMA, logging,
checkpoints and exact resume.

Exact resume: every micro-batch reseeds torch from (seed, rank, micro-batch index) and the data order is a pure
function of (seed, epoch), so a resumed run repeats what an uninterrupted run would do; the checkpoint holds
model, EMA, optimizer, grad scaler, step, data position, RNG states and the resolved config.
"""
import copy
import json
import logging
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from erw.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint
from erw.config import dump_config
from erw.data import sample_latents
from erw.losses import Objective

CHECKPOINT_FORMAT = 1
METRICS_FILE = "metrics.jsonl"  # one JSON record per logged step, appended across resumes


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (seed, rank, index, ...), stable across Python runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 2 ** 31], dtype=np.uint64)))


class ResumableShardSampler(Sampler):
    """Endless, deterministic, per-process index stream over shuffled epochs.

    Epoch e is a permutation seeded by (seed, e); process r takes every world-th index of it, cut to whole
    micro-batches. The stream can start at any micro-batch, which is how a resumed run continues mid-epoch.
    """

    def __init__(self, dataset_len: int, local_batch_size: int, rank: int, world_size: int, seed: int,
                 start_micro_batch: int = 0):
        self.micro_batches_per_epoch = dataset_len // (world_size * local_batch_size)
        if self.micro_batches_per_epoch == 0:
            raise ValueError(f"dataset of {dataset_len} items is smaller than one global micro-batch "
                             f"({world_size} processes x {local_batch_size}): lower --batch-size")
        self.dataset_len, self.local_batch_size = dataset_len, local_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_micro_batch = start_micro_batch

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        perm = torch.randperm(self.dataset_len, generator=g)
        return perm[self.rank::self.world_size][: self.micro_batches_per_epoch * self.local_batch_size]

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start_micro_batch, self.micro_batches_per_epoch)
        offset *= self.local_batch_size
        while True:
            yield from self.epoch_indices(epoch)[offset:].tolist()
            epoch, offset = epoch + 1, 0


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter (pos_embed is constant in both)."""
    ema_params = list(ema.parameters())
    model_params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)


def setup_logger(exp_dir: Optional[str]) -> logging.Logger:
    """Console + exp_dir/log.txt on the main process; silent elsewhere (exp_dir None)."""
    logger = logging.getLogger("erw")
    logger.handlers.clear()
    logger.propagate = False
    if exp_dir is None:
        logger.addHandler(logging.NullHandler())
        return logger
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    for handler in (logging.StreamHandler(), logging.FileHandler(os.path.join(exp_dir, "log.txt"))):
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


class Trainer:
    """Sets up accelerate, the experiment folder and logging for a resolved config; `fit` runs the loop."""

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
            mixed_precision=config["mixed_precision"],
            log_with=None if config["report_to"] == "none" else config["report_to"],
            project_config=ProjectConfiguration(project_dir=self.exp_dir,
                                                logging_dir=os.path.join(self.exp_dir, "logs")),
        )
        acc = self.accelerator
        per_process, rem = divmod(config["batch_size"], acc.num_processes * config["gradient_accumulation_steps"])
        if rem or per_process == 0:
            raise ValueError(f"--batch-size {config['batch_size']} is not divisible by processes "
                             f"({acc.num_processes}) x gradient accumulation steps "
                             f"({config['gradient_accumulation_steps']})")
        self.local_batch_size = per_process
        if config["allow_tf32"]:
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
        if acc.is_main_process:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            if not config["resume"] and os.path.exists(os.path.join(self.ckpt_dir, "last.pt")):
                raise FileExistsError(f"{self.exp_dir} already holds a run: pass --resume to continue it, or "
                                      "choose another --exp-name")
            dump_config(config, os.path.join(self.exp_dir, "config.yaml"))
        acc.wait_for_everyone()
        self.logger = setup_logger(self.exp_dir if acc.is_main_process else None)
        self.device = acc.device
        torch.manual_seed(config["seed"])  # the model built next is the same on every process and every run

    def log(self, message: str) -> None:
        self.logger.info(message)

    def log_image(self, name: str, image, step: int) -> None:
        """uint8 (H, W, 3) image to the active tracker, if any (main process)."""
        report_to = self.config["report_to"]
        if report_to == "wandb":
            import wandb
            self.accelerator.get_tracker("wandb").log({name: wandb.Image(image)}, step=step)
        elif report_to == "tensorboard":
            self.accelerator.get_tracker("tensorboard").writer.add_image(name, image, step, dataformats="HWC")

    def fit(self, model: torch.nn.Module, model_args: Dict[str, Any], objective: Objective, dataset,
            teachers: List[torch.nn.Module], hooks: Optional[List[Callable]] = None) -> Dict[str, Any]:
        """Train `model` for config["max_train_steps"] optimizer steps. `hooks` are called as
        hook(trainer, step, ema) on the main process after step 0 and every optimizer step."""
        cfg, acc = self.config, self.accelerator
        hooks = hooks or []
        model.to(self.device)
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["learning_rate"],
                                      betas=(cfg["adam_beta1"], cfg["adam_beta2"]),
                                      weight_decay=cfg["adam_weight_decay"], eps=cfg["adam_epsilon"])
        step, micro_batch = 0, 0
        last_path = os.path.join(self.ckpt_dir, "last.pt")
        if cfg["resume"]:
            if not os.path.isfile(last_path):
                raise FileNotFoundError(f"--resume: no checkpoint at {last_path}")
            ckpt = load_checkpoint(last_path)
            if ckpt.get("model_args") != model_args:
                raise ValueError(f"--resume: {last_path} was written for model {ckpt.get('model_args')}, "
                                 f"this run builds {model_args}")
            load_state_dict_strict(model, ckpt["model"], f"{last_path} [model]")
            load_state_dict_strict(ema, ckpt["ema"], f"{last_path} [ema]")
            optimizer.load_state_dict(ckpt["opt"])
            step, micro_batch = ckpt["step"], ckpt["data_position"]["micro_batch"]
            scaler_state = ckpt.get("scaler")
            torch.set_rng_state(ckpt["rng"]["torch"])
            if torch.cuda.is_available() and ckpt["rng"].get("cuda"):
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
            self.log(f"Resumed from {last_path} at step {step}")
        else:
            scaler_state = None

        if cfg["compile"]:
            model = torch.compile(model)
        model, optimizer = acc.prepare(model, optimizer)
        if scaler_state is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(scaler_state)

        sampler = ResumableShardSampler(len(dataset), self.local_batch_size, acc.process_index, acc.num_processes,
                                        cfg["seed"], start_micro_batch=micro_batch)
        loader = DataLoader(dataset, batch_size=self.local_batch_size, sampler=sampler, drop_last=True,
                            num_workers=cfg["num_workers"], pin_memory=self.device.type == "cuda",
                            persistent_workers=cfg["num_workers"] > 0)
        if acc.is_main_process:
            unwrapped = acc.unwrap_model(model)
            n_params = sum(p.numel() for p in unwrapped.parameters())
            built = f"truncated to {len(unwrapped.blocks)} blocks" if model_args["truncated"] else "full"
            self.log(f"{model_args['model']} ({built}): {n_params:,} parameters; {len(dataset):,} training items; "
                     f"global batch {cfg['batch_size']} = {acc.num_processes} processes x {self.local_batch_size} "
                     f"x {cfg['gradient_accumulation_steps']} accumulation")
            if cfg["report_to"] != "none":
                acc.init_trackers(project_name="ERW", config=cfg,
                                  init_kwargs={"wandb": {"name": cfg["exp_name"]}} if cfg["report_to"] == "wandb" else {})
            if step == 0:
                for hook in hooks:
                    hook(self, step, ema)

        state = dict(model=model, ema=ema, optimizer=optimizer, model_args=model_args)
        progress = tqdm(total=cfg["max_train_steps"], initial=step, desc=f"{cfg['phase']} {cfg['exp_name']}",
                        disable=not acc.is_main_process, dynamic_ncols=True)
        data_iter = iter(loader)
        window_start, window_steps = time.perf_counter(), 0
        history: List[Dict[str, float]] = []
        model.train()
        while step < cfg["max_train_steps"]:
            images, moments, labels = next(data_iter)
            torch.manual_seed(derive_seed(cfg["seed"], acc.process_index, micro_batch))
            images, moments, labels = (x.to(self.device, non_blocking=True) for x in (images, moments, labels))
            latents = sample_latents(moments)
            with torch.no_grad(), acc.autocast():
                teacher_tokens = [teacher(images) for teacher in teachers]
            with acc.accumulate(model):
                loss, logs = objective(model, latents, labels, teacher_tokens, step)
                loss_all = acc.gather(loss.detach().reshape(1))
                if not torch.isfinite(loss_all).all():
                    raise FloatingPointError(
                        f"non-finite loss {loss_all.tolist()} at step {step} (micro-batch {micro_batch}); stopping. "
                        f"The last good checkpoint is {last_path if os.path.exists(last_path) else 'none yet'}")
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_batch += 1
            if not acc.sync_gradients:
                continue
            update_ema(ema, acc.unwrap_model(model), cfg["ema_decay"])
            step += 1
            window_steps += 1
            progress.update(1)
            if step % cfg["log_every"] == 0 or step == cfg["max_train_steps"]:
                elapsed = time.perf_counter() - window_start
                record = {k: acc.reduce(v.to(self.device).float(), "mean").item() for k, v in logs.items()}
                record.update(grad_norm=float(grad_norm), lr=optimizer.param_groups[0]["lr"],
                              images_per_sec=cfg["batch_size"] * window_steps / elapsed, step=step)
                history.append(record)
                if acc.is_main_process:
                    with open(os.path.join(self.exp_dir, METRICS_FILE), "a") as f:
                        f.write(json.dumps(record) + "\n")
                acc.log({k: v for k, v in record.items() if k != "step"}, step=step)
                progress.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "grad_norm") if k in record})
                self.log(f"step {step}: " + ", ".join(f"{k}={v:.5g}" for k, v in record.items() if k != "step"))
                window_start, window_steps = time.perf_counter(), 0
            if step % cfg["checkpointing_steps"] == 0 or step == cfg["max_train_steps"]:
                self.save(state, step, micro_batch)
            if acc.is_main_process:
                for hook in hooks:
                    hook(self, step, ema)
        progress.close()
        acc.wait_for_everyone()
        acc.end_training()
        return {"step": step, "history": history, "model": acc.unwrap_model(model), "ema": ema}

    def save(self, state: Dict[str, Any], step: int, micro_batch: int) -> None:
        """checkpoints/NNNNNNN.pt and last.pt (a hard link to it, atomically replaced), main process only."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt = {
                "format": CHECKPOINT_FORMAT,
                "model": acc.unwrap_model(state["model"]).state_dict(),
                "ema": state["ema"].state_dict(),
                "opt": state["optimizer"].state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "step": step,
                "data_position": {"micro_batch": micro_batch},
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                "config": self.config,
                "model_args": state["model_args"],
            }
            path = os.path.join(self.ckpt_dir, f"{step:07d}.pt")
            save_checkpoint(ckpt, path)
            tmp = os.path.join(self.ckpt_dir, ".last.pt.tmp")
            if os.path.exists(tmp):
                os.remove(tmp)
            try:
                os.link(path, tmp)
            except OSError:  # file systems without hard links: write a second copy
                save_checkpoint(ckpt, tmp)
            os.replace(tmp, os.path.join(self.ckpt_dir, "last.pt"))
            self.log(f"Saved checkpoint {path}")
        acc.wait_for_everyone()
