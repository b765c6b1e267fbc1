"""One SiT training step (forward, backward, AdamW) timed as a median over steps; prints JSON.

    python -m bench.bench_train_step --model SiT-B/2 --batch-size 8 --impl ours repa-reference

`repa-reference` is tests/reference_sit.py, a REPA-style SiT built from timm blocks, timed on the same inputs so
the two implementations are compared side by side in one process. Each takes its own training loop's optimizer:
fused AdamW for ours (erw/trainer.py), torch's default (foreach) AdamW for REPA's train.py.
"""
import argparse
import json
import statistics
import sys
import time

if not __package__:  # started as a path: the repository root, where erw/ lives, is not importable
    sys.exit("error: run from the repository root as `python -m bench.bench_train_step ...`")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.sit import create_sit  # noqa: E402
from tests.reference_sit import RefSiT  # noqa: E402


def build(impl, model_name, input_size, z_dim, encoder_depth):
    if impl == "ours":
        return create_sit(model_name, input_size=input_size, num_classes=1000, z_dims=[z_dim],
                          encoder_depth=encoder_depth)
    with torch.device("meta"):  # read the registry's architecture without allocating it
        arch = create_sit(model_name, input_size=input_size, z_dims=[])
    return RefSiT(input_size=input_size, patch_size=arch.patch_size, hidden_size=arch.pos_embed.shape[-1],
                  depth=arch.depth, num_heads=arch.num_heads,
                  num_classes=1000, encoder_depth=encoder_depth, z_dims=(z_dim,))


def time_steps(model, batch_size, input_size, z_dim, steps, warmup, device, fused):
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0, fused=fused)
    g = torch.Generator().manual_seed(0)
    tokens = (input_size // model.patch_size) ** 2
    x = torch.randn(batch_size, 4, input_size, input_size, generator=g).to(device)
    target = torch.randn_like(x)
    t = torch.rand(batch_size, generator=g).to(device)
    y = torch.randint(0, 1000, (batch_size,), generator=g).to(device)
    teacher = F.normalize(torch.randn(batch_size, tokens, z_dim, generator=g), dim=-1).to(device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        v, zs = model(x, t, y)
        loss = F.mse_loss(v, target) - (F.normalize(zs[0], dim=-1) * teacher).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SiT-B/2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256, help="image side; latents are resolution / 8")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--impl", nargs="+", default=["ours"], choices=["ours", "repa-reference"])
    parser.add_argument("--encoder-depth", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    input_size = args.resolution // 8
    results = []
    for impl in args.impl:
        torch.manual_seed(0)
        model = build(impl, args.model, input_size, 768, args.encoder_depth)
        times = time_steps(model, args.batch_size, input_size, 768, args.steps, args.warmup, device,
                           fused=impl == "ours")
        median = statistics.median(times)
        results.append({"impl": impl, "optimizer": "fused AdamW" if impl == "ours" else "AdamW (foreach)",
                        "model": args.model, "batch_size": args.batch_size, "device": str(device),
                        "threads": torch.get_num_threads(), "steps": args.steps,
                        "sec_per_step": round(median, 4), "images_per_sec": round(args.batch_size / median, 3),
                        "all_step_secs": [round(s, 4) for s in times]})
        del model
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
