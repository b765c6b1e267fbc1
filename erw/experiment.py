"""What both training entry points build the same way: config, trainer, teachers, dataset and model."""
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch

from erw.cli import InvalidInput, MissingInput, check_folder_path, refusals_of_models
from erw.config import TRAIN, resolve_config
from erw.data import MOMENT_CHANNELS, VAE_DOWNSAMPLING, ImageLatentDataset
from erw.teacher_cache import (TeacherCache, TeacherCacheIdentity, cached_teachers, run_identity,
                               teacher_weights_sha256)
from erw.trainer import Trainer
from erw.warm_start import load_warmup
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


def build_teachers(config: Dict[str, Any], log, dataset: ImageLatentDataset) -> List[torch.nn.Module]:
    """Frozen teachers on the CPU, or [] when the run has no alignment term (they are then not even loaded). With a
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
        run = run_identity(names, hashes, config["resolution"], preprocessing, len(dataset),
                           dataset.identity("--teacher-cache")["images_sha256"])
        differences = cache.identity.differences(run, TeacherCacheIdentity.RUN_FIELDS)
        if differences:
            raise InvalidInput(f"--teacher-cache {cache.cache_dir} was made for other settings than this run's: "
                               f"{'; '.join(differences)}; make a cache for this run (python -m "
                               "preprocessing.dataset_tools cache-teachers) or drop --teacher-cache")
        log(f"Teacher tokens from the cache {cache.cache_dir} ({cache.identity.dtype}, {', '.join(names)}): no "
            "teacher built, no image decoded")
        return cached_teachers(cache.identity)
    with refusals_of_models("--enc-type/--enc-weights"):
        teachers = load_teachers(config["enc_type"], config["resolution"], config["enc_weights"])
    for teacher in teachers:
        if teacher.name.startswith("random"):
            log(f"WARNING: teacher {teacher.name} has RANDOM weights: alignment targets are meaningless "
                "(tests and demo only)")
        else:
            log(f"Teacher {teacher.name}: {teacher.embed_dim}-wide tokens")
    return teachers


def build_dataset(config: Dict[str, Any]) -> ImageLatentDataset:
    """The training set (with the teacher cache when the run has one), checked against --resolution,
    --num-classes and the micro-batch (--batch-size / --gradient-accumulation-steps images, at least)."""
    cache = open_teacher_cache(config)
    dataset = ImageLatentDataset(config["data_dir"], load_images=uses_alignment(config), teacher_cache=cache)
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
    """What can be checked before anything is built or written, named by the user's flags: the run folder's path,
    block counts against the model's depth (the model itself would only name its own constructor argument) and the
    Phase-1 checkpoint a warm start needs."""
    check_folder_path(os.path.join(config["output_dir"], config["exp_name"]), "--output-dir/--exp-name")
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
    """Resolve the config for `phase`; build the dataset, the teachers and the model (with Phase 2's warm start
    unless resuming), which read and check every input; only then set up the trainer, which makes the experiment
    folder: a refused run writes nothing."""
    config = resolve_config(phase, argv, description=description)
    check_inputs(config)
    dataset = build_dataset(config)
    notes: List[str] = []  # logged once the run folder's log exists
    if dataset.packed:
        notes.append(f"Latents from the packed dataset in {config['data_dir']} (memory-mapped, {len(dataset):,} items)")
    teachers = build_teachers(config, notes.append, dataset)
    model_args = build_model_args(config, teachers)
    torch.manual_seed(config["seed"])  # the model is the same on every process and every run
    with refusals_of_models(f"--model {config['model']}"):
        model = create_sit(**model_args)
    if config.get("warmup_ckpt") and not config["resume"]:
        notes.append(load_warmup(model, config["warmup_ckpt"], config["warmup_weights"], config["warmup_layers"],
                                 expected_depth=config["warmup_depth"], add_rope=config["add_rope_after_warmup"]))
    elif phase == TRAIN and not config["warmup_ckpt"]:
        notes.append("No warm start: every block starts from its fresh initialization (a baseline run)")
    trainer = Trainer(config)
    for note in notes:
        trainer.log(note)
    return Run(config, trainer, [teacher.to(trainer.device) for teacher in teachers], dataset, model_args, model)
