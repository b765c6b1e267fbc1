"""What both training entry points build the same way: config, trainer, teachers, dataset and model."""
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch

from erw.cli import InvalidInput, MissingInput, refusals_of_models
from erw.config import resolve_config
from erw.data import MOMENT_CHANNELS, VAE_DOWNSAMPLING, ImageLatentDataset
from erw.teacher_cache import (TeacherCache, TeacherCacheIdentity, cached_teachers, run_identity,
                               teacher_weights_sha256)
from erw.trainer import Trainer
from models.encoders import load_teachers, preprocessing_text, teacher_names
from models.sit import SiT, SiT_models, create_sit

LATENT_CHANNELS = MOMENT_CHANNELS // 2  # the stored moments are [mean | std] of the latent


def uses_alignment(config: Dict[str, Any]) -> bool:
    """Phase 1 always aligns; Phase 2 aligns unless proj_coeff is 0 or there is no teacher (plain SiT)."""
    if config["enc_type"] is None:
        return False
    return config["phase"] == "warmup" or config["proj_coeff"] > 0


def open_teacher_cache(config: Dict[str, Any]) -> Optional[TeacherCache]:
    """The run's --teacher-cache, when it has one and aligns."""
    return TeacherCache(config["teacher_cache"]) if config["teacher_cache"] and uses_alignment(config) else None


def build_teachers(config: Dict[str, Any], device, log, dataset: ImageLatentDataset) -> List[torch.nn.Module]:
    """Frozen teachers on `device`, or [] when the run has no alignment term (they are then not even loaded). With a
    teacher cache (on the dataset), stand-ins that pass its tokens on, once its identity is shown to be the run's."""
    if not uses_alignment(config):
        if config["phase"] == "warmup":
            raise InvalidInput("Phase 1 aligns with a teacher: --enc-type must name one")
        log("No alignment term (proj_coeff = 0 or enc_type = none): no teacher loaded")
        return []
    cache = dataset.teacher_cache
    if cache is not None:
        with refusals_of_models("--enc-type/--enc-weights"):
            names = teacher_names(config["enc_type"])
            hashes = teacher_weights_sha256(config["enc_type"], config["enc_weights"])
            preprocessing = preprocessing_text(names)
        run = run_identity(names, hashes, config["resolution"], preprocessing, dataset.image_files)
        differences = cache.identity.differences(run, TeacherCacheIdentity.RUN_FIELDS)
        if differences:
            raise InvalidInput(f"--teacher-cache {cache.cache_dir} was made for other settings than this run's: "
                               f"{'; '.join(differences)}; make a cache for this run (python -m "
                               "preprocessing.dataset_tools cache-teachers) or drop --teacher-cache")
        log(f"Teacher tokens from the cache {cache.cache_dir} ({cache.identity.dtype}, {', '.join(names)}): no "
            "teacher built, no image decoded")
        return [teacher.to(device) for teacher in cached_teachers(cache.identity)]
    with refusals_of_models("--enc-type/--enc-weights"):
        teachers = load_teachers(config["enc_type"], config["resolution"], config["enc_weights"])
    for teacher in teachers:
        if teacher.name.startswith("random"):
            log(f"WARNING: teacher {teacher.name} has RANDOM weights: alignment targets are meaningless "
                "(tests and demo only)")
        else:
            log(f"Teacher {teacher.name}: {teacher.embed_dim}-wide tokens")
    return [teacher.to(device) for teacher in teachers]


def build_dataset(config: Dict[str, Any]) -> ImageLatentDataset:
    """The training set (with the teacher cache when the run has one), checked against --resolution and
    --num-classes."""
    cache = open_teacher_cache(config)
    dataset = ImageLatentDataset(config["data_dir"], load_images=uses_alignment(config), teacher_cache=cache)
    if dataset.resolution != config["resolution"]:
        raise InvalidInput(f"{config['data_dir']} holds {dataset.resolution}px images but --resolution is "
                           f"{config['resolution']}")
    if dataset.num_classes > config["num_classes"]:
        raise InvalidInput(f"{config['data_dir']} has labels up to {dataset.num_classes - 1} but --num-classes is "
                           f"{config['num_classes']}")
    return dataset


def build_model_args(config: Dict[str, Any], teachers: List[torch.nn.Module]) -> Dict[str, Any]:
    """Plain-dict arguments of models.sit.create_sit, stored in every checkpoint so sampling rebuilds the model.
    Phase 1: built_depth = warmup_depth blocks, the projector after the last; Phase 2: every block, the projector
    after block encoder_depth."""
    if config["resolution"] % VAE_DOWNSAMPLING:
        raise InvalidInput(f"--resolution {config['resolution']} is not divisible by {VAE_DOWNSAMPLING} (the VAE)")
    warmup = config["phase"] == "warmup"
    return {
        "model": config["model"],
        "input_size": config["resolution"] // VAE_DOWNSAMPLING,
        "in_channels": LATENT_CHANNELS,
        "num_classes": config["num_classes"],
        "class_dropout_prob": config["cfg_prob"],
        "encoder_depth": config["warmup_depth"] if warmup else config["encoder_depth"],
        "z_dims": [t.embed_dim for t in teachers],
        "qk_norm": config["qk_norm"],
        "use_rope": config["use_rope"],
        "built_depth": config["warmup_depth"] if warmup else None,
    }


def check_inputs(config: Dict[str, Any]) -> None:
    """What can be checked before anything is built or written, named by the user's flags: block counts against the
    model's depth (the model itself would only name its own constructor argument) and the Phase-1 checkpoint a
    warm start needs."""
    warmup_ckpt = config.get("warmup_ckpt")
    if warmup_ckpt and not config["resume"] and not os.path.isfile(warmup_ckpt):
        raise MissingInput(f"--warmup-ckpt {warmup_ckpt} does not exist: run Phase 1 first (train_warmup.py "
                           "with the same --config), or pass --warmup-ckpt none for a baseline without warmup")
    if config.get("add_rope_after_warmup") and not warmup_ckpt:
        raise InvalidInput("--add-rope-after-warmup describes a warm start; it needs --warmup-ckpt")
    if config["model"] not in SiT_models:
        raise InvalidInput(f"--model {config['model']} is not one of {', '.join(SiT_models)}")
    with torch.device("meta"), refusals_of_models("--model"):  # the architecture without allocating it
        depth = SiT_models[config["model"]](z_dims=[]).depth
    checks = []
    if config["phase"] == "warmup" or warmup_ckpt:  # a run without warm start never reads --warmup-depth
        checks.append(("--warmup-depth", config["warmup_depth"]))
    if config["phase"] != "warmup" and uses_alignment(config):
        checks.append(("--encoder-depth", config["encoder_depth"]))
    for flag, value in checks:
        if not 1 <= value <= depth:
            raise InvalidInput(f"{flag} {value} is outside 1..{depth}: {config['model']} has {depth} blocks")


class Run(NamedTuple):
    config: Dict[str, Any]
    trainer: Trainer
    teachers: List[torch.nn.Module]
    dataset: ImageLatentDataset
    model_args: Dict[str, Any]
    model: SiT


def prepare_run(phase: str, argv: Optional[Sequence[str]], description: str) -> Run:
    """Resolve the config for `phase`, set up the trainer (experiment folder, accelerate), then build the teachers,
    the dataset and the model, in that order (the model after the trainer has seeded torch)."""
    config = resolve_config(phase, argv, description=description)
    check_inputs(config)
    trainer = Trainer(config)
    dataset = build_dataset(config)
    if dataset.packed:
        trainer.log(f"Latents from the packed dataset in {config['data_dir']} (memory-mapped, {len(dataset):,} items)")
    teachers = build_teachers(config, trainer.device, trainer.log, dataset)
    model_args = build_model_args(config, teachers)
    with refusals_of_models(f"--model {config['model']}"):
        model = create_sit(**model_args)
    return Run(config, trainer, teachers, dataset, model_args, model)
