"""Cost of a Phase-1 step vs a Phase-2 step, the teacher's share, and the alignment overhead; prints JSON.

    python -m bench.bench_phases --model SiT-B/2 --batch-size 8 --warmup-depth 4 --encoder-depth 4

Each step is the real objective (erw/losses.py Objective) + backward + AdamW on random inputs; the teacher is a
DINOv2 architecture with random weights (timing only). Reported (medians over --steps):
  phase1_step_s       Phase 1 (truncated to --warmup-depth blocks, NT-Xent), teacher excluded
  phase2_align_step_s Phase 2 (full model, velocity + lambda * NT-Xent), teacher excluded
  phase2_plain_step_s Phase 2 without alignment (no projector, no teacher)
  teacher_s           one teacher forward on the batch
"""
import argparse
import json
import statistics
import sys
import time

if not __package__:  # started as a path: the repository root, where erw/ lives, is not importable
    sys.exit("error: run from the repository root as `python -m bench.bench_phases ...`")

import timm  # noqa: E402
import torch  # noqa: E402

from erw.losses import Objective  # noqa: E402
from erw.transport import get_path  # noqa: E402
from models.encoders import DINOV2_MODELS, Teacher, teacher_input_size  # noqa: E402
from models.sit import create_sit  # noqa: E402


def timed(fn, device) -> float:
    """Seconds of fn(), the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_time(fn, steps, warmup, device):
    times = [timed(fn, device) for _ in range(warmup + steps)]
    return statistics.median(times[warmup:])


def train_step_fn(model, objective, latents, labels, teacher_tokens):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0)

    def step():
        with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=latents.device.type == "cuda"):
            loss, _ = objective(model, latents, labels, teacher_tokens, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SiT-B/2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--teacher", default="b", choices=sorted(DINOV2_MODELS), help="DINOv2 size (random weights)")
    parser.add_argument("--warmup-depth", type=int, default=4)
    parser.add_argument("--encoder-depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    n, latent = args.batch_size, args.resolution // 8

    vit = timm.create_model(DINOV2_MODELS[args.teacher][0], pretrained=False, num_classes=0,
                            img_size=teacher_input_size(args.resolution))
    teacher = Teacher(f"dinov2-vit-{args.teacher} (random weights)", vit, args.resolution).to(device)
    images = torch.randint(0, 256, (n, 3, args.resolution, args.resolution), dtype=torch.uint8, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        teacher_s = median_time(lambda: teacher(images), args.steps, args.warmup, device)
        tokens = [teacher(images).float()]
    latents = torch.randn(n, 4, latent, latent, device=device)
    labels = torch.randint(0, 1000, (n,), device=device)
    common = dict(input_size=latent, num_classes=1000)

    phase1 = create_sit(args.model, encoder_depth=args.warmup_depth, z_dims=[teacher.embed_dim],
                        built_depth=args.warmup_depth, **common).to(device)
    phase1_s = median_time(train_step_fn(phase1, Objective(velocity=False, align="ntxent"), latents, labels, tokens),
                           args.steps, args.warmup, device)
    del phase1
    path = get_path("linear")
    full = create_sit(args.model, encoder_depth=args.encoder_depth, z_dims=[teacher.embed_dim], **common).to(device)
    align = Objective(velocity=True, align="ntxent", path=path, proj_coeff=0.5, proj_half_life=50000,
                      proj_decay="exp")
    phase2_align_s = median_time(train_step_fn(full, align, latents, labels, tokens), args.steps, args.warmup, device)
    del full
    plain = create_sit(args.model, z_dims=[], **common).to(device)
    phase2_plain_s = median_time(train_step_fn(plain, Objective(velocity=True, align=None, path=path), latents,
                                               labels, []), args.steps, args.warmup, device)
    print(json.dumps({
        "model": args.model, "batch_size": n, "device": str(device), "threads": torch.get_num_threads(),
        "warmup_depth": args.warmup_depth, "encoder_depth": args.encoder_depth, "teacher": teacher.name,
        "teacher_s": round(teacher_s, 4), "phase1_step_s": round(phase1_s, 4),
        "phase2_align_step_s": round(phase2_align_s, 4), "phase2_plain_step_s": round(phase2_plain_s, 4),
        "phase1_over_phase2": round(phase1_s / phase2_align_s, 3),
        "teacher_share_of_phase1_step": round(teacher_s / (teacher_s + phase1_s), 3),
        "alignment_overhead_incl_teacher": round((phase2_align_s + teacher_s) / phase2_plain_s - 1, 3),
        "alignment_overhead_excl_teacher": round(phase2_align_s / phase2_plain_s - 1, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
