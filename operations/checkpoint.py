"""Checkpoints in one place: a run's checkpoints/ folder (NNNNNNN.pt per save, last.pt a hard link to the newest),
written atomically, loaded weights-only, and turned into a SiT, ours (model_args inside) and REPA-style ones (REPA's
and the ERW release's: pickled `args`, model flags beside them), with strict loads that name what differs."""
import argparse
import errno
import os
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from operations.cli import InvalidInput, MissingInput, refusals
from operations.config import AUTO, OPTIONS_BY_NAME, add_flags
from operations.files import atomic_write, temp_path_for
from operations.preemption import EXIT_IO_ERROR
from models.weights import load_state_dict_strict
from models.sit import SiT, create_sit


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space, read-only, quota, ...); the message says which file, why, and
    which checkpoint is the last good one. Entry points exit with `exit_code`."""
    exit_code = EXIT_IO_ERROR


def write_failure_reason(error: BaseException) -> str:
    """Why a write failed, in words: the first OSError with an errno in the exception's chain (torch's writer
    wraps ENOSPC in a RuntimeError), e.g. "No space left on device (ENOSPC)"; else the error itself."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            name = errno.errorcode.get(current.errno, str(current.errno))
            return f"{current.strerror or os.strerror(current.errno)} ({name})"
        current = current.__cause__ or current.__context__
    return f"{type(error).__name__}: {error}"


def save_checkpoint(state: dict, path: str) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint on the CPU with weights_only=True (plain dicts, tensors and numbers only)."""
    if os.path.isdir(path):
        raise InvalidInput(f"checkpoint {path} is a folder; give a checkpoint file in it, e.g. "
                           f"{os.path.join(path, 'checkpoints', LAST_CHECKPOINT)}")
    if not os.path.isfile(path):
        raise MissingInput(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InvalidInput(f"could not read checkpoint {path}: {e}") from e


WEIGHTS = ("ema", "model")  # the two sets of weights a checkpoint holds
CHECKPOINT_FORMAT = 1
LAST_CHECKPOINT = "last.pt"
_NUMBERED_CHECKPOINT = re.compile(r"^(\d{7,})\.pt$")


def numbered_checkpoints(ckpt_dir: str) -> List[Tuple[int, str]]:
    """(step, path) of checkpoints/NNNNNNN.pt, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted((int(m.group(1)), os.path.join(ckpt_dir, m.group(0)))
                  for m in map(_NUMBERED_CHECKPOINT.match, os.listdir(ckpt_dir)) if m)


def find_resume_checkpoint(ckpt_dir: str, log: Callable[[str], None]) -> Tuple[str, Dict[str, Any], List[str]]:
    """The newest state in ckpt_dir that loads, whichever file holds it, its contents, and the files skipped on the
    way. last.pt is usually a link to the newest numbered file; it is read on its own only when it is not one (a
    numbered file deleted to save disk, or the copy written where hard links fail), and a numbered file newer than it
    wins (a crash between writing NNNNNNN.pt and linking last.pt leaves last.pt one behind). Files that do not load
    are skipped, with a warning; each is newer than the state found, so the caller keeps them (keep_unreadable)."""
    numbered = numbered_checkpoints(ckpt_dir)
    last = os.path.join(ckpt_dir, LAST_CHECKPOINT)
    if not numbered and not os.path.isfile(last):
        raise MissingInput(f"--resume: no checkpoint in {ckpt_dir}; drop --resume to start this run")

    skipped = []

    def read(path: str) -> Optional[Dict[str, Any]]:
        try:
            ckpt = load_checkpoint(path)
        except InvalidInput as e:
            log(f"WARNING: skipping unreadable checkpoint {path}: {e}")
            skipped.append(path)
            return None
        if not isinstance(ckpt, dict) or checkpoint_step(ckpt) is None:
            log(f"WARNING: skipping checkpoint {path}: it records no training step")
            skipped.append(path)
            return None
        return ckpt

    found = None  # (path, contents) of last.pt when it is a file of its own
    if os.path.isfile(last) and not any(os.path.samefile(last, path) for _, path in numbered):
        ckpt = read(last)
        found = None if ckpt is None else (last, ckpt)
    for step, path in reversed(numbered):
        if found is not None and step <= checkpoint_step(found[1]):
            break
        ckpt = read(path)
        if ckpt is not None:
            return path, ckpt, skipped
    if found is None:
        raise InvalidInput(f"--resume: none of the checkpoints in {ckpt_dir} can be read")
    return (*found, skipped)


UNREADABLE_SUFFIX = ".unreadable"


def keep_unreadable(paths: List[str], step: int, log: Callable[[str], None]) -> None:
    """Rename the checkpoints a resume skipped to NAME.unreadable: the run writes their steps (or last.pt) again, and
    no run overwrites a file newer than the state it resumed from."""
    for path in paths:
        os.replace(path, path + UNREADABLE_SUFFIX)
        log(f"Kept the unreadable {path} as {path + UNREADABLE_SUFFIX}: it is newer than step {step}, which this run "
            "continues from")


def numbered_checkpoint(ckpt_dir: str, step: int) -> str:
    return os.path.join(ckpt_dir, f"{step:07d}.pt")


def write_checkpoint(ckpt_dir: str, step: int, ckpt: dict) -> str:
    """checkpoints/NNNNNNN.pt, then last.pt as a hard link to it, each atomically; returns the numbered path."""
    path = numbered_checkpoint(ckpt_dir, step)
    save_checkpoint(ckpt, path)
    last = os.path.join(ckpt_dir, LAST_CHECKPOINT)
    tmp = temp_path_for(last)
    try:
        os.link(path, tmp)
        os.replace(tmp, last)
    except OSError:  # file systems without hard links: a second copy, written atomically
        if os.path.exists(tmp):
            os.remove(tmp)
        save_checkpoint(ckpt, last)
    return path


# REPA's generate.py flags that describe the model (our checkpoints carry the same facts in "model_args"), with
# REPA's training defaults, which are also ours; the projectors' widths default to the checkpoint's.
_REPA_MODEL_FLAGS = ("model", "resolution", "num_classes", "encoder_depth", "qk_norm")
REPA_MODEL_FLAG_DEFAULTS = {**{name: OPTIONS_BY_NAME[name].default for name in _REPA_MODEL_FLAGS},
                            "projector_embed_dims": None}




def checkpoint_step(ckpt: dict) -> Optional[int]:
    """The training step of our checkpoints ("step") and REPA's ("steps"); None when the checkpoint has none."""
    step = ckpt.get("step", ckpt.get("steps"))
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def add_repa_model_flags(parser, title: str) -> None:
    """REPA's generate.py flags that describe the model (REPA_MODEL_FLAG_DEFAULTS), as an argument group."""
    group = parser.add_argument_group(title)
    add_flags(group, _REPA_MODEL_FLAGS, typed=True)
    group.add_argument("--projector-embed-dims", default=None,
                       help="teacher widths, comma-separated (default: the widths of the checkpoint's projectors)")


def _model_args_from_flags(flags: Dict[str, object]) -> Dict[str, object]:
    """REPA's model flags (absent ones as None) -> create_sit keyword arguments implied by the given ones."""
    implied = {name: flags[name] for name in ("model", "num_classes", "encoder_depth", "qk_norm")
               if flags.get(name) is not None}
    if flags.get("resolution") is not None:
        if flags["resolution"] % 8:
            raise InvalidInput(f"--resolution must be a multiple of 8 (the VAE's downsampling), "
                               f"got {flags['resolution']}")
        implied["input_size"] = flags["resolution"] // 8
    if flags.get("encoder_depth") == AUTO:
        raise InvalidInput("--encoder-depth auto is for train.py (Phase 2 with a warm start); here give the block "
                           "number the checkpoint's projector reads, e.g. --encoder-depth 8 for REPA's SiT-XL/2")
    dims = flags.get("projector_embed_dims")
    if dims is not None:
        try:
            implied["z_dims"] = [int(z) for z in dims.split(",") if z.strip()]
        except ValueError:
            raise InvalidInput(f"--projector-embed-dims must be comma-separated integers, got {dims!r}") from None
    return implied


# REPA's train.py flags that describe the model, as its checkpoints' `args` spell them (the ERW release adds
# use_rope and l2r_depth, its Phase-1 depth).
_REPA_ARGS = _REPA_MODEL_FLAGS + ("use_rope",)
# The ERW release (LINs-lab/ERW, weights SempraETY/ERW) stores its RoPE tables in the state dict.
RELEASE_ROPE_KEYS = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")
_PLAIN = (bool, int, float, str, type(None))


def checkpoint_args(ckpt: dict, path: str) -> Dict[str, Any]:
    """A REPA-style checkpoint's `args` (REPA's and the ERW release's train.py pickle their argparse.Namespace) as a
    dict of plain values; {} when there is none."""
    args = ckpt.get("args")
    if args is None:
        return {}
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    if not isinstance(args, dict):
        raise InvalidInput(f"checkpoint {path}: 'args' is a {type(args).__name__}; expected REPA's argparse.Namespace")
    odd = [k for k, v in args.items() if not isinstance(v, _PLAIN) and not (
        isinstance(v, (list, tuple)) and all(isinstance(x, _PLAIN) for x in v))]
    if odd:
        raise InvalidInput(f"checkpoint {path}: 'args' holds values that are not plain: {', '.join(sorted(odd))}")
    return dict(args)


def repa_model_args(ckpt: dict, path: str, weights: Dict[str, torch.Tensor],
                    model_flags: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """create_sit arguments of a REPA-style checkpoint: from its `args`, then the model flags given (which must agree
    with `args`), then REPA_MODEL_FLAG_DEFAULTS; projector widths from the weights unless --projector-embed-dims. No
    final layer: a Phase-1 file of the release (blocks 0..k-1, projectors after block k, no RoPE whatever
    `args.use_rope` says): built_depth = encoder_depth = k, which must equal `args.l2r_depth` when present."""
    args = checkpoint_args(ckpt, path)
    from_args = {name: args[name] for name in _REPA_ARGS if args.get(name) is not None}
    given = {k: v for k, v in (model_flags or {}).items() if v is not None}
    conflicts = [f"{k}: flag gives {given[k]!r}, checkpoint args have {from_args[k]!r}"
                 for k in sorted(set(given) & set(from_args)) if given[k] != from_args[k]]
    if conflicts:
        raise InvalidInput(f"model flags disagree with {path} (its args describe the model it holds; drop the flags "
                           f"or correct them): " + "; ".join(conflicts))
    use_rope = bool(from_args.pop("use_rope", False))
    model_args = _model_args_from_flags({**REPA_MODEL_FLAG_DEFAULTS, **from_args, **given})
    if "z_dims" not in model_args:
        heads = sorted((int(k.split(".")[1]), t.shape[0]) for k, t in weights.items()
                       if re.fullmatch(r"projectors\.\d+\.4\.weight", k))
        model_args["z_dims"] = [width for _, width in heads]
    model_args.update(use_rope=use_rope, built_depth=None)
    if "final_layer.linear.weight" not in weights:
        k = len({key.split(".")[1] for key in weights if key.startswith("blocks.")})
        if args.get("l2r_depth") is not None and args["l2r_depth"] != k:
            raise InvalidInput(f"{path} holds {k} blocks and no final layer (a Phase-1 file), but its args say "
                               f"l2r_depth {args['l2r_depth']}")
        model_args.update(built_depth=k, encoder_depth=k, use_rope=False)
    return model_args


def without_rope_tables(model: SiT, weights: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    """The weights without the ERW release's RoPE tables, once they are shown to be the model's own: a table that
    differs would make its weights run as a model nobody trained. Present only with RoPE, both of them; without RoPE
    they stay in and the strict load names them as unexpected. Tolerance: our tables come from float64 angles, the
    release's from float32 ones (up to grid - 1 rad, off by ~grid eps32 before the cosine): 4 grid eps32."""
    if model.feat_rope is None:
        return weights
    missing = [key for key in RELEASE_ROPE_KEYS if key not in weights]
    if len(missing) == 1:
        raise InvalidInput(f"{path}: has one RoPE table but not {missing[0]}")
    if missing:
        return weights
    tol = 4 * model.grid_size * torch.finfo(torch.float32).eps
    for key in RELEASE_ROPE_KEYS:
        ours = getattr(model.feat_rope, key.split(".")[1])
        theirs = weights[key]
        if theirs.shape != ours.shape:
            raise InvalidInput(f"{path}: {key} has shape {tuple(theirs.shape)}, the model's RoPE table "
                               f"{tuple(ours.shape)}")
        error = float((theirs.float() - ours).abs().max())
        if not error <= tol:
            raise InvalidInput(f"{path}: {key} differs from the model's RoPE table by up to {error:.3g} (tolerance "
                               f"{tol:.1g}): it was made for another RoPE convention, grid or base; refusing to run "
                               "its weights with other rotations")
    return {k: v for k, v in weights.items() if k not in RELEASE_ROPE_KEYS}


def read_weights(ckpt_path: str, weights: str = "ema", model_flags: Optional[Dict[str, object]] = None,
                 flags_for_ours: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, object], Dict[str, object]]:
    """`weights` ("ema" | "model") of a checkpoint, the create_sit arguments they were trained with, and info =
    {"format": "erw" | "repa", "config" (ours: the training config), "step"}. Ours carry model_args, which model
    flags given must match (flags_for_ours=False: the flags are for REPA-style checkpoints only); REPA-style ones
    ({"model", "ema", "opt", "steps", "args"}) go through repa_model_args."""
    if weights not in WEIGHTS:
        raise InvalidInput(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    with torch.serialization.safe_globals([argparse.Namespace]):  # what REPA's train.py pickles as "args"
        ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt, dict):
        raise InvalidInput(f"checkpoint {ckpt_path} holds a {type(ckpt).__name__}, expected a dict")
    if weights not in ckpt:
        raise InvalidInput(f"checkpoint {ckpt_path} has no '{weights}' weights (keys: {', '.join(sorted(ckpt))})")
    state_dict = ckpt[weights]
    if "model_args" in ckpt:
        model_args = ckpt["model_args"]
        conflicts = [f"{k}: flag gives {v!r}, checkpoint has {model_args.get(k)!r}"
                     for k, v in _model_args_from_flags(model_flags or {}).items() if model_args.get(k) != v]
        if conflicts and flags_for_ours:
            raise InvalidInput(f"model flags disagree with {ckpt_path} (our checkpoints carry their architecture; "
                               f"drop the flags): " + "; ".join(conflicts))
        info = {"format": "erw", "config": dict(ckpt.get("config") or {})}
    else:
        model_args = repa_model_args(ckpt, ckpt_path, state_dict, model_flags)
        info = {"format": "repa", "config": {}}
    info["step"] = checkpoint_step(ckpt)
    return state_dict, model_args, info


def load_model(ckpt_path: str, weights: str = "ema", model_flags: Optional[Dict[str, object]] = None,
               flags_for_ours: bool = True) -> Tuple[SiT, Dict[str, object]]:
    """(a SiT in eval mode with a checkpoint's `weights` loaded strictly, read_weights' info plus "model_args")."""
    state_dict, model_args, info = read_weights(ckpt_path, weights, model_flags, flags_for_ours)
    with refusals("the model the checkpoint describes"):
        model = create_sit(**model_args)
    state_dict = without_rope_tables(model, state_dict, ckpt_path)
    with refusals("checkpoint"):
        load_state_dict_strict(model, state_dict, f"{ckpt_path} ['{weights}']")
    info["model_args"] = model_args
    return model.eval().requires_grad_(False), info
