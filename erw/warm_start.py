"""Phase 2's warm start: copy a Phase-1 checkpoint's embedders, k blocks and projectors into a full SiT.

Keys map by name (blocks.i -> blocks.{start + i}); every checkpoint tensor must land on a model tensor of the same
shape and every embedder/projector of the model must be covered, or loading fails saying what does not fit.
Everything else (blocks outside the warmed range, the final layer) keeps its fresh adaLN-Zero initialization.
"""
import re
from typing import Dict

import torch

from models.sit import SiT

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.*)$")
TRANSFERRED_PREFIXES = ("x_embedder.", "t_embedder.", "y_embedder.", "pos_embed", "projectors.")


def load_warmup(model: SiT, source: Dict[str, torch.Tensor], args: Dict, path: str, start_layer: int = 0,
                expected_depth: int = None, add_rope: bool = False) -> str:
    """Load Phase-1 weights `source` (built with create_sit arguments `args`; read from `path`, which messages name)
    into `model` in place; returns a one-line summary of what was loaded.

    add_rope: the model has RoPE and the blocks were warmed without it, as the ERW release's recipe does
    (--add-rope-after-warmup); anything else is refused."""
    if args.get("built_depth") is None:
        raise ValueError(f"{path} is not a Phase-1 checkpoint (train_warmup.py writes model_args.built_depth, the "
                         "blocks it built; a REPA-style file without a final layer is one too)")
    k = args["built_depth"]
    depth = len(model.blocks)
    if expected_depth is not None and expected_depth != k:
        raise ValueError(f"{path} warmed up {k} blocks but --warmup-depth is {expected_depth}")
    if start_layer < 0 or start_layer + k > depth:
        raise ValueError(f"{path} holds {k} warmed blocks; placed at {start_layer}..{start_layer + k - 1} they do "
                         f"not fit a {depth}-block model (--warmup-layers {start_layer})")
    # The position table is a fixed sin-cos function of absolute grid indices: blocks warmed on a 16x16 grid never saw
    # the indices of a 32x32 one, and no resampling of a fixed table is known to be what they expect. Refused, rather
    # than transferred without evidence (docs/imagenet512.md).
    side, ckpt_side = model.grid_size * model.patch_size * 8, args["input_size"] * 8
    if side != ckpt_side:
        raise ValueError(f"{path} was warmed at {ckpt_side} px ({args['input_size']}x{args['input_size']} latents); "
                         f"this run trains at {side} px: a warm start must be at the resolution of its Phase 1; run "
                         f"Phase 1 at {side} px")
    hidden, ckpt_hidden = model.pos_embed.shape[-1], source["pos_embed"].shape[-1]
    if hidden != ckpt_hidden:
        raise ValueError(f"{path} is a {ckpt_hidden}-wide model ({args.get('model')}); this run builds a "
                         f"{hidden}-wide {model.__class__.__name__}")
    # Attention options add no shape a key check would catch (RoPE has no weights; q/k norms not in the checkpoint
    # would start fresh), yet the warmed blocks were trained with or without them.
    warmed_with_rope = bool(args.get("use_rope", False))
    if add_rope and (warmed_with_rope or not model.use_rope):
        raise ValueError(f"--add-rope-after-warmup adds RoPE over blocks warmed without it: it needs --use-rope "
                         f"(this run: {model.use_rope}) and a checkpoint warmed without RoPE ({path}: "
                         f"use_rope = {warmed_with_rope})")
    for name, flag in (("qk_norm", "--qk-norm"), ("use_rope", "--use-rope")):
        trained, now = bool(args.get(name, False)), getattr(model, name)
        if trained != now and not (name == "use_rope" and add_rope):
            raise ValueError(f"{path} was trained with {name} = {trained}, but this run sets {flag} = {now}: "
                             f"warmed blocks must keep their attention; {'drop' if now else 'add'} {flag}"
                             + (" (or pass --add-rope-after-warmup to add RoPE on purpose, as the ERW release "
                                  "does)" if name == "use_rope" and now else ""))
    ckpt_z = list(args.get("z_dims", []))
    if ckpt_z != model.z_dims:
        raise ValueError(f"{path} has projectors for teacher widths {ckpt_z}; "
                         f"this run's teachers give {model.z_dims}")

    target = model.state_dict()
    mapped = {}
    for key, value in source.items():
        match = _BLOCK_KEY.match(key)
        new_key = f"blocks.{start_layer + int(match.group(1))}.{match.group(2)}" if match else key
        if not match and not key.startswith(TRANSFERRED_PREFIXES):
            raise ValueError(f"{path}: unexpected tensor {key} in a Phase-1 checkpoint")
        if new_key not in target:
            raise ValueError(f"{path}: {key} has no counterpart {new_key} in the model")
        if target[new_key].shape != value.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)} but the model's {new_key} is "
                             f"{tuple(target[new_key].shape)}")
        mapped[new_key] = value
    uncovered = [k_ for k_ in target if k_.startswith(TRANSFERRED_PREFIXES) and k_ not in mapped]
    if uncovered:
        raise ValueError(f"{path} lacks {len(uncovered)} embedder/projector tensor(s) of the model: "
                         f"{', '.join(uncovered[:5])}")
    target.update(mapped)
    model.load_state_dict(target, strict=True)
    fresh = [i for i in range(depth) if not start_layer <= i < start_layer + k]
    rope = " RoPE added over the warmed blocks, which were trained without it (--add-rope-after-warmup)." \
        if add_rope else ""
    return (f"Warm start from {path}: embedders, "
            f"{k} blocks -> blocks {start_layer}..{start_layer + k - 1}, {len(model.z_dims)} projector(s); "
            f"fresh init: {len(fresh)} blocks ({_ranges(fresh)}) and the final layer.{rope}")


def _ranges(indices) -> str:
    if not indices:
        return "none"
    parts, start = [], indices[0]
    for a, b in zip(indices, indices[1:] + [None]):
        if b != a + 1:
            parts.append(f"{start}..{a}" if a != start else f"{a}")
            start = b
    return ", ".join(parts)
