"""Experiment configuration: the options of a training run, read from a YAML file in configs/ and command-line
flags, each checked for type, choices and range (docs/operations.md, "Configuration")."""
import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from operations.cli import ArgumentParser, InvalidInput, within
from operations.files import atomic_write
from erw.precision import PRECISIONS
from erw.samplers import MODES
from models.sit import SiT_models

WARMUP, TRAIN = "warmup", "train"
BOTH = (WARMUP, TRAIN)


def _text(value):
    # YAML turns `exp_name: [a, b]` or `data_dir: 2024` into non-strings; str() would accept them silently.
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {type(value).__name__} {value!r} (quote it in YAML)")
    return value


def _text_or_none(value):
    if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
        return None
    return _text(value)


def _bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError(f"expected true/false, got {value!r}")


def _int(value):
    if isinstance(value, str):
        value = float(value) if any(c in value for c in ".eE") else int(value)
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def _float(value):
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):  # nan passes every comparison with a bound; inf is no setting either
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def _key_list(value):
    """Config keys as a list: a YAML list, or one comma-separated string (flag); dashes read as underscores."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected config keys, comma-separated, got {value!r}")
    keys = [v.strip().replace("-", "_") for v in value]
    unknown = [k for k in keys if k not in OPTIONS_BY_NAME]
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}")
    return keys


AUTO = "auto"


def _depth_or_auto(value):
    """A block number >= 1, or "auto" (resolved by resolve_encoder_depth once the whole config is known)."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        depth = _int(value)
    except (TypeError, ValueError):
        depth = 0  # refused below
    if depth < 1:
        raise ValueError(f"expected an integer >= 1 or {AUTO}, got {value!r}")
    return depth


_int.__name__, _float.__name__ = "integer", "number"  # Option.type.__name__ says what kind a number is


@dataclass(frozen=True)
class Option:
    name: str                       # snake_case key; the flag is --name-with-dashes
    type: Callable[[Any], Any]
    default: Any
    help: str
    phases: Sequence[str] = BOTH
    choices: Optional[Sequence[Any]] = None
    bounds: Optional[str] = None    # the values a number may take, in interval notation: "[0, 1)", "(0, inf)"
    required: bool = False
    run_control: bool = False  # --resume may change it (how long, how often, where to); others need --resume-override

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


# The sampler's settings, declared once: sample_ddp.py's flags, and the in-training FID's config keys
# (training_fid_option), which run the same generation code.
SAMPLER_OPTIONS_BY_NAME: Dict[str, Option] = {o.name: o for o in [
    Option("mode", _text, "sde", "sde: Euler-Maruyama (SiT's default, the paper's); ode: Euler (or Heun with "
           "sample_ddp.py --heun)", choices=MODES),
    Option("num_steps", _int, 250, "sampler steps per sample (Heun: 2N-1 model evaluations)", bounds="[1, inf)"),
    Option("cfg_scale", _float, 1.0, "classifier-free guidance scale (1 = none; REPA's flag)", bounds="[1, inf)"),
    Option("guidance_low", _float, 0.0, "guidance only for t >= this (t = 1 is noise; REPA's flag)", bounds="[0, 1]"),
    Option("guidance_high", _float, 1.0, "guidance only for t <= this (REPA's flag; 0.7 in REPA's best setting)",
           bounds="[0, 1]"),
    Option("precision", _text, "tf32", "fp32, tf32 (TF32 matmuls, REPA's default) or bf16 (autocast for the SiT)",
           choices=PRECISIONS),
    Option("bitwise", _bool, False, "one row per model and VAE call, on one CPU thread: images bitwise independent of "
           "the batch size and the process count, several times slower (reproducibility checks)"),
]}


def training_fid_option(name: str, key: str, default: Any = None, note: str = "") -> Option:
    """The sampler's option `name` as the in-training FID's config key `key` (fid_... where a bare name would read as
    a training setting)."""
    option = SAMPLER_OPTIONS_BY_NAME[name]
    where = f"sample_ddp.py {option.flag}" + (f"; {note}" if note else "")
    return dataclasses.replace(option, name=key, default=option.default if default is None else default,
                               help=f"in-training FID: {option.help} ({where})", phases=(TRAIN,), run_control=True)


OPTIONS: List[Option] = [
    # --- experiment ---
    Option("exp_name", _text_or_none, None, "experiment name: outputs go to OUTPUT_DIR/EXP_NAME", required=True,
           run_control=True),
    Option("output_dir", _text, "exps", "root folder of experiments", run_control=True),
    Option("resume", _bool, False, "continue from the newest intact checkpoint in OUTPUT_DIR/EXP_NAME/checkpoints "
           "(model, EMA, optimizer, grad scaler, step, RNG, data position)", run_control=True),
    Option("resume_override", _key_list, [], "keys (comma-separated) that --resume may change although they change "
           "what is trained, e.g. learning_rate,batch_size; recorded in the run's config history", run_control=True),
    Option("seed", _int, 0, "global seed; each step reseeds from (seed, rank, step)", bounds="[0, inf)"),
    Option("report_to", _text, "none", "experiment tracker (wandb stays offline unless WANDB_MODE=online)",
           choices=("wandb", "tensorboard", "none"), run_control=True),
    Option("log_every", _int, 10, "log losses, grad norm, lr and throughput every N steps",
           run_control=True, bounds="[1, inf)"),
    # --- data ---
    Option("data_dir", _text, "data/imagenet256", "dataset folder: images/ and vae-sd/ (REPA layout)"),
    Option("resolution", _int, 256, "image side in pixels; latents are resolution / 8", bounds="[8, inf)"),
    Option("num_classes", _int, 1000, "number of classes (the null class for CFG is one more)", bounds="[1, inf)"),
    Option("num_workers", _int, 4, "dataloader worker processes per GPU", run_control=True, bounds="[0, inf)"),
    # --- model ---
    Option("model", _text, "SiT-XL/2", "SiT size and patch size (models/sit.py)", choices=tuple(SiT_models)),
    Option("qk_norm", _bool, False, "LayerNorm on queries and keys"),
    Option("use_rope", _bool, False, "2D rotary position embedding in attention (paper appendix D: helps)"),
    Option("cfg_prob", _float, 0.1, "label dropout probability (trains the null class for CFG)", bounds="[0, 1]"),
    # --- teacher and alignment ---
    Option("enc_type", _text_or_none, "dinov2-vit-b", "frozen teacher(s), comma-separated REPA names "
           "(dinov2-vit-b, ..., random-vit-tiny); none = no alignment"),
    Option("enc_weights", _text_or_none, None, "local teacher weight file(s), comma-separated like --enc-type"),
    Option("teacher_cache", _text_or_none, None, "folder of the teachers' tokens computed once (python -m "
           "preprocessing.dataset_tools cache-teachers): no teacher is built and no image decoded"),
    Option("warmup_depth", _int, 5, "Phase 1 trains blocks 0..k-1 with the projector on block k's output "
           "(paper table 3 'ERW depth'; k=5 best for SiT-XL/2)", bounds="[1, inf)"),
    Option("align_loss", _text, "ntxent", "alignment loss: ntxent (ERW) or cosine (REPA)",
           choices=("ntxent", "cosine")),
    Option("ntxent_temp", _float, 0.1, "NT-Xent temperature tau", bounds="(0, inf)"),
    Option("encoder_depth", _depth_or_auto, 8, "Phase 2 projector on the output of this block (1-based; paper table "
           "3 'Proj. depth', 18 best for SiT-XL/2); auto = warmup_layers + warmup_depth, the output of the last "
           "warmed block (table 4's 'Depth X-Y'; needs --warmup-ckpt)", phases=(TRAIN,)),
    Option("proj_coeff", _float, 0.5, "lambda0, the alignment weight at the start of Phase 2 (paper table 3)",
           phases=(TRAIN,), bounds="[0, inf)"),
    Option("proj_decay", _text, "exp", "lambda schedule: exp = proj_coeff * 2^(-s / proj_half_life), none = constant",
           phases=(TRAIN,), choices=("exp", "none")),
    Option("proj_half_life", _float, 50000.0, "half-life of lambda in Phase-2 steps (ERW release: 50K)",
           phases=(TRAIN,), bounds="(0, inf)"),
    # --- warm start (Phase 2) ---
    Option("warmup_ckpt", _text_or_none, None, "Phase-1 checkpoint to warm-start from (none = REPA / SiT baseline)",
           phases=(TRAIN,)),
    Option("warmup_weights", _text, "model", "which Phase-1 weights to load", phases=(TRAIN,),
           choices=("model", "ema")),
    Option("add_rope_after_warmup", _bool, False, "the warm-start blocks were warmed without RoPE and this run adds "
           "it (--use-rope), as the ERW release's recipe does; without this a warm start refuses the mismatch",
           phases=(TRAIN,)),
    Option("warmup_layers", _int, 0, "place the k warmed blocks at START..START+k-1 (paper table 4)",
           phases=(TRAIN,), bounds="[0, inf)"),
    # --- diffusion (Phase 2) ---
    Option("path_type", _text, "linear", "interpolant: linear (alpha=1-t, sigma=t) or cosine", phases=(TRAIN,),
           choices=("linear", "cosine")),
    Option("weighting", _text, "uniform", "training time distribution: uniform or lognormal (EDM sigmas)",
           phases=(TRAIN,), choices=("uniform", "lognormal")),
    Option("vae", _text, "stabilityai/sd-vae-ft-ema", "VAE for decoding sample grids: local folder or hub id",
           phases=(TRAIN,), run_control=True),
    Option("sample_grid_every", _int, 10000, "save a sample grid from the EMA model every N steps (REPA's "
           "--sampling-steps)", phases=(TRAIN,), run_control=True, bounds="[1, inf)"),
    Option("sample_grid_size", _int, 16, "images in each sample grid", phases=(TRAIN,),
           run_control=True, bounds="[1, inf)"),
    Option("sample_num_steps", _int, 50, "Euler ODE steps for sample grids", phases=(TRAIN,),
           run_control=True, bounds="[1, inf)"),
    # --- in-training FID (Phase 2): evaluations/training_fid.py, with sample_ddp.py's generation code ---
    Option("fid_every", _int, 0, "every N steps and at the end of training, log FID, sFID and IS of --fid-num-samples "
           "EMA samples against --fid-ref (0 = off)", phases=(TRAIN,), run_control=True, bounds="[0, inf)"),
    Option("fid_num_samples", _int, 10000, "samples per in-training FID (a reduced FID, as appendix D's search; the "
           "paper's reported FIDs use 50K)", phases=(TRAIN,), run_control=True, bounds="[2, inf)"),
    training_fid_option("num_steps", "fid_num_steps", default=50, note="the paper's FIDs use 250"),
    *[training_fid_option(name, f"fid_{name}") for name in ("mode", "precision", "bitwise")],
    Option("fid_ref", _text_or_none, None, "reference batch .npz of the in-training FID, e.g. ADM's "
           "VIRTUAL_imagenet256_labeled.npz (docs/evaluation.md)", phases=(TRAIN,), run_control=True),
    Option("inception_weights", _text_or_none, None, "Inception of the in-training FID: the "
           "pt_inception-2015-12-05-6726825d.pth file, none = the torch hub cache, or random (meaningless numbers; "
           "tests)", phases=(TRAIN,), run_control=True),
    Option("fd_dinov2", _text_or_none, None, "also log FD-DINOv2 (edm2's definition, evaluations/fd_dinov2.py) of the "
           "same samples at each in-training FID: the DINOv2 ViT-L/14 weights file (dinov2_vitl14_pretrain.pth or "
           "timm's model.safetensors); none = off", phases=(TRAIN,), run_control=True),
    *[training_fid_option(name, name) for name in ("cfg_scale", "guidance_low", "guidance_high")],  # REPA's names
    # --- optimisation ---
    Option("batch_size", _int, 256, "global batch size (all processes and accumulation steps)", bounds="[1, inf)"),
    Option("gradient_accumulation_steps", _int, 1, "micro-batches per optimizer step", bounds="[1, inf)"),
    Option("max_train_steps", _int, 400000, "optimizer steps in this phase", run_control=True, bounds="[0, inf)"),
    Option("checkpointing_steps", _int, 50000, "write checkpoints/NNNNNNN.pt every N steps",
           run_control=True, bounds="[1, inf)"),
    Option("learning_rate", _float, 1e-4, "AdamW learning rate (constant)", bounds="(0, inf)"),
    Option("adam_beta1", _float, 0.9, "AdamW beta1", bounds="[0, 1)"),
    Option("adam_beta2", _float, 0.999, "AdamW beta2", bounds="[0, 1)"),
    Option("adam_weight_decay", _float, 0.0, "AdamW weight decay", bounds="[0, inf)"),
    Option("adam_epsilon", _float, 1e-8, "AdamW epsilon", bounds="(0, inf)"),
    Option("max_grad_norm", _float, 1.0, "clip the global gradient norm to this (in the loss's units, after fp16's "
           "unscaling); 0 = no clipping", bounds="[0, inf)"),
    Option("ema_decay", _float, 0.9999, "EMA decay per optimizer step", bounds="[0, 1)"),
    Option("mixed_precision", _text, "fp16", "autocast precision", choices=("no", "fp16", "bf16")),
    Option("allow_tf32", _bool, False, "TF32 matmuls on Ampere+ GPUs"),
    Option("compile", _bool, False, "torch.compile the model", run_control=True),
]

# Keys that were renamed: a config file with the old name is refused, naming the new one.
RENAMED_KEYS = {"sampling_steps": "sample_grid_every"}
OPTIONS_BY_NAME: Dict[str, Option] = {o.name: o for o in OPTIONS}
INVOCATION_KEYS = ("resume", "resume_override")  # describe this command, not the run: never compared on resume


class ConfigError(InvalidInput):
    """A setting that cannot be used, named by its flag or YAML key and file."""


def _convert(option: Option, value: Any, where: str) -> Any:
    try:
        value = option.type(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: bad value {value!r} for '{option.name}' ({e})") from None
    if option.choices is not None and value not in option.choices:
        raise ConfigError(f"{where}: '{option.name}' must be one of {list(option.choices)}, got {value!r}")
    if option.bounds is not None and value is not None and not within(value, option.bounds):
        raise ConfigError(f"{where}: '{option.name}' must be in {option.bounds}, got {value!r}")
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load keeps the last of two equal keys without a word; a config that says two things is refused."""

    def construct_mapping(self, node, deep=False):
        lines: Dict[Any, int] = {}
        for key_node, _ in node.value:
            # `<<: *base` and then a key of base overrides it on purpose; a key that is not a scalar super() refuses.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(f"config file {self.name}: '{key}' is given twice (lines {lines[key]} and {line}); "
                                  "keep the one you mean")
            lines[key] = line
        return super().construct_mapping(node, deep)


def _read_yaml(path: str, chain=()) -> Dict[str, Any]:
    """Raw mapping of a config file, with `base: other.yaml` (relative to this file) merged underneath it:
    top-level keys and each phase section override the base's key by key."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.abspath(path) in chain:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values")
    for section in BOTH:
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise ConfigError(f"config file {path}: the '{section}' section must be a mapping of keys to values, "
                              f"got {raw[section]!r}")
    base_name = raw.pop("base", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str):
        raise ConfigError(f"config file {path}: 'base' must be a file name, got {base_name!r}")
    base = _read_yaml(os.path.join(os.path.dirname(path), base_name), chain + (os.path.abspath(path),))
    merged = {**base, **{k: v for k, v in raw.items() if k not in BOTH}}
    for section in BOTH:
        if section in base or section in raw:
            merged[section] = {**(base.get(section) or {}), **(raw.get(section) or {})}
    return merged


def load_yaml(path: str, phase: str) -> Dict[str, Any]:
    """Read a config file: top-level keys, then the `phase` section on top. Every key of every section must be
    known, apply to its section's phase and hold a valid value, whichever phase runs: a typo in `train:` stops
    train_warmup.py at once, not Phase 2 after Phase 1's hours."""
    raw = _read_yaml(path)
    values: Dict[str, Any] = {}
    for section_name, section in [(None, raw)] + [(name, raw.get(name) or {}) for name in BOTH]:
        where = path if section_name is None else f"{path} [{section_name}]"
        for key, value in section.items():
            if key in BOTH and section_name is None:
                continue
            if key not in OPTIONS_BY_NAME:
                renamed = f" (now '{RENAMED_KEYS[key]}')" if key in RENAMED_KEYS else ""
                raise ConfigError(f"{where}: unknown config key '{key}'{renamed}")
            option = OPTIONS_BY_NAME[key]
            if section_name is not None and section_name not in option.phases:
                raise ConfigError(f"{where}: '{key}' does not apply to the {section_name} phase")
            converted = _convert(option, value, where)
            if phase in option.phases and section_name in (None, phase):
                values[key] = converted
    return values


def add_flags(parser, options: Sequence[Any], typed: bool = False, defaults: bool = False,
              aliases: Optional[Dict[str, Sequence[str]]] = None) -> None:
    """Add `options` (Options, or names of OPTIONS) as flags to an argparse parser or group. typed=False: a flag
    defaults to None ("not given") and stays a string for resolve_config to check; typed=True: argparse checks it
    like a config value, and defaults=True makes the option's default the flag's. aliases: extra spellings."""
    for option in options:
        option = OPTIONS_BY_NAME[option] if isinstance(option, str) else option
        details = ([f"choices: {', '.join(map(str, option.choices))}"] if option.choices else []) + \
            ([f"in {option.bounds}"] if option.bounds else []) + \
            ([] if defaults else [f"default: {option.default}"])  # else HelpFormatter adds it
        kwargs = dict(dest=option.name, default=option.default if defaults else None,
                      help=option.help + (f" ({'; '.join(details)})" if details else ""))
        if option.type is _bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = option.name.upper()
            if typed:
                kwargs["type"] = _flag_type(option)
        parser.add_argument(option.flag, *(aliases or {}).get(option.name, ()), **kwargs)


def _flag_type(option: Option) -> Callable[[str], Any]:
    """An argparse `type` that converts and checks like a config value and names the flag in argparse's error."""
    def convert(text: str) -> Any:
        try:
            return _convert(option, text, "")
        except ConfigError as e:  # argparse names the flag before the message
            raise argparse.ArgumentTypeError(str(e).removeprefix(": ")) from None
    return convert


def build_parser(phase: str, description: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML file in configs/ (keys as below, snake_case; "
                        "default: none, built-in defaults)")
    add_flags(parser, [o.name for o in OPTIONS if phase in o.phases])
    return parser


def resolve_config(phase: str, argv: Optional[Sequence[str]] = None, description: str = "") -> Dict[str, Any]:
    """Parse argv for `phase` and return the resolved config as a plain dict (defaults < YAML < flags)."""
    args = build_parser(phase, description).parse_args(argv)
    config = {o.name: o.default for o in OPTIONS if phase in o.phases}
    if args.config is not None:
        config.update(load_yaml(args.config, phase))
    for name, value in vars(args).items():
        if name == "config" or value is None:
            continue
        config[name] = _convert(OPTIONS_BY_NAME[name], value, f"flag {OPTIONS_BY_NAME[name].flag}")
    missing = [OPTIONS_BY_NAME[n].flag for n in config if OPTIONS_BY_NAME[n].required and config[n] is None]
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join(missing)} (set in --config or on the command line)")
    config["config"] = args.config
    config["phase"] = phase
    if phase == TRAIN:
        resolve_encoder_depth(config)
    check_blocks_and_warm_start(config)
    return config


def check_blocks_and_warm_start(config: Dict[str, Any]) -> None:
    """What depends on several settings, named by their flags: block numbers against the model's depth, and a warm
    start's flags."""
    warmup_ckpt = config.get("warmup_ckpt")
    if config.get("add_rope_after_warmup") and not warmup_ckpt:
        raise ConfigError("--add-rope-after-warmup describes a warm start; it needs --warmup-ckpt")
    with torch.device("meta"):  # the architecture without allocating it
        depth = SiT_models[config["model"]](z_dims=[]).depth
    checks = []
    if config["phase"] == WARMUP or warmup_ckpt:  # a run without warm start never reads --warmup-depth
        checks.append(("--warmup-depth", config["warmup_depth"]))
    if config["phase"] == TRAIN and config["enc_type"] and config["proj_coeff"] > 0:
        checks.append(("--encoder-depth", config["encoder_depth"]))
    for flag, value in checks:
        if not 1 <= value <= depth:
            raise ConfigError(f"{flag} {value} is outside 1..{depth}: {config['model']} has {depth} blocks")


def resolve_encoder_depth(config: Dict[str, Any]) -> None:
    """Turn encoder_depth "auto" into warmup_layers + warmup_depth in place: the k warmed blocks sit at S..S+k-1
    (0-based), so the head reads block S+k in REPA's 1-based count (table 4's "Depth X-Y"). Records where the number
    came from in config["encoder_depth_source"]."""
    if config["encoder_depth"] != AUTO:
        config["encoder_depth_source"] = "given"
        return
    if config["warmup_ckpt"] is None:
        raise ConfigError(f"--encoder-depth {AUTO} puts the head after the last warmed block, so it needs a warm "
                          "start: give --warmup-ckpt (Phase 1's last.pt), or a block number for --encoder-depth")
    config["encoder_depth"] = config["warmup_layers"] + config["warmup_depth"]
    config["encoder_depth_source"] = (f"{AUTO}: warmup_layers {config['warmup_layers']} + warmup_depth "
                                      f"{config['warmup_depth']}")


def dump_config(config: Dict[str, Any], path: str) -> None:
    atomic_write(path, lambda f: f.write(yaml.safe_dump(config, sort_keys=False).encode()))


def resume_changes(stored: Dict[str, Any], current: Dict[str, Any]) -> Tuple[Dict[str, Tuple[Any, Any]],
                                                                              Dict[str, Tuple[Any, Any]]]:
    """Compare a checkpoint's config with this run's: ({training key: (old, new)}, {run-control key: (old, new)}).
    Keys the checkpoint does not record (written before an option existed) are not compared."""
    training, run_control = {}, {}
    for name, new in current.items():
        option = OPTIONS_BY_NAME.get(name)
        if option is None or name in INVOCATION_KEYS or name not in stored or stored[name] == new:
            continue
        (run_control if option.run_control else training)[name] = (stored[name], new)
    return training, run_control
