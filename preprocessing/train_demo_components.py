"""Train the demo's three small components on generated demo images (CPU, offline) into assets/demo/ (docs/demo.md):
vae/ (models/vae.py "demo"), teacher.safetensors (models/encoders.py "demo-vit-tiny") and classifier.safetensors
(evaluations/demo_metrics.py); each prints its accuracy or PSNR on held-out images, which none of them has seen.

    python -m preprocessing.train_demo_components                  # all three, the committed files (~20 min on 2 cores)
    python -m preprocessing.train_demo_components --only teacher --out /tmp/x --steps-scale 0.01   # a quick check
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:  # started as a path: the repository root, where erw/ lives, is not importable
    sys.exit("error: run from the repository root as `python -m preprocessing.train_demo_components ...`")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from evaluations.demo_metrics import DEMO_NUM_CLASSES, DEMO_RESOLUTION, DemoClassifier  # noqa: E402
from models.encoders import build_demo_vit, preprocess_for_teacher  # noqa: E402
from models.vae import DEMO_VAE_CONFIG, SD_VAE_SCALE  # noqa: E402
from preprocessing.dataset_tools import demo_image  # noqa: E402

DEMO_ASSETS = os.path.join(ROOT, "assets", "demo")
HELD_OUT_SEED_OFFSET = 1000  # held-out images: seed + this, never trained on


def demo_images(count: int, seed: int) -> tuple:
    """uint8 (count, 3, 64, 64) images and int64 labels (i mod 10), as make-demo draws them."""
    images = np.stack([demo_image(i % DEMO_NUM_CLASSES, i, seed, DEMO_RESOLUTION) for i in range(count)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.arange(count) % DEMO_NUM_CLASSES


def batches(count: int, batch_size: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), unit="step", mininterval=2):
        yield torch.randint(0, count, (batch_size,), generator=g)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR in dB of uint8 image batches."""
    mse = ((a.double() - b.double()) ** 2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(255.0 ** 2 / mse)).mean())


def train_vae(images, held_out, steps: int, out_dir: str) -> None:
    from diffusers.models import AutoencoderKL
    from models.vae import decode_latents, encode_moments, model_to_vae_latents, vae_to_model_latents
    torch.manual_seed(0)
    vae = AutoencoderKL(**DEMO_VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    x_all = images.float() / 127.5 - 1.0
    for index in batches(len(images), 16, steps, seed=1):
        x = x_all[index]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # L1 + L2 keeps flat colours and sharp edges; the KL weight is SD-VAE's order of magnitude.
        loss = (reconstruction - x).abs().mean() + ((reconstruction - x) ** 2).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)
    # Rescaled exactly (the first and last 1x1 convolutions) so that its latents times SD's 0.18215, as training
    # applies it, have unit standard deviation, as SD-VAE's do on ImageNet.
    with torch.no_grad():
        means = torch.cat([vae.encode(x_all[i:i + 256]).latent_dist.mean for i in range(0, len(x_all), 256)])
        gain = 1.0 / (SD_VAE_SCALE * float(means.std()))
        channels = vae.config.latent_channels
        vae.quant_conv.weight[:channels] *= gain            # posterior mean x gain
        vae.quant_conv.bias[:channels] *= gain
        vae.quant_conv.bias[channels:] += 2 * np.log(gain)  # log-variance: std x gain
        vae.post_quant_conv.weight /= gain                  # the decoder sees the same input as before
    vae.save_pretrained(out_dir, safe_serialization=True)
    moments = encode_moments(vae, held_out)
    model_latents = vae_to_model_latents(moments[:, :channels])
    decoded = decode_latents(vae, model_latents).permute(0, 3, 1, 2)
    print(f"vae: {sum(p.numel() for p in vae.parameters()):,} parameters, latent std x 0.18215 = "
          f"{float(model_latents.std()):.3f}, held-out PSNR {psnr(decoded, held_out):.2f} dB "
          f"(round trip check {float((model_to_vae_latents(model_latents) - moments[:, :channels]).abs().max()):.1e})"
          f" -> {out_dir}")


def _probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Held-out accuracy of a ridge-regression linear probe onto one-hot labels (closed form, float64)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mean) / std, (test_x - mean) / std
    a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
    b = torch.cat([b, torch.ones(len(b), 1, dtype=b.dtype)], 1)
    targets = F.one_hot(train_y, DEMO_NUM_CLASSES).double()
    weights = torch.linalg.solve(a.T @ a + 1e-3 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ targets)
    return float(((b @ weights).argmax(1) == test_y).double().mean())


@torch.no_grad()
def pooled_teacher_tokens(teacher, images: torch.Tensor) -> torch.Tensor:
    """Mean over the patch tokens of the frozen teacher, float64 (N, D)."""
    return torch.cat([teacher(images[i:i + 256]).mean(1) for i in range(0, len(images), 256)]).double()


def train_teacher(images, labels, held_out, held_out_labels, steps: int, path: str) -> None:
    from safetensors.torch import save_file
    teacher = build_demo_vit(DEMO_RESOLUTION, weights="random")
    vit = teacher.vit.train()
    vit.requires_grad_(True)
    torch.manual_seed(0)
    head = torch.nn.Linear(vit.embed_dim, DEMO_NUM_CLASSES)
    optimizer = torch.optim.AdamW(list(vit.parameters()) + list(head.parameters()), lr=1e-3, weight_decay=0.05)
    for index in batches(len(images), 64, steps, seed=2):
        x = preprocess_for_teacher(images[index], teacher.input_size)
        tokens = vit.forward_features(x)[:, vit.num_prefix_tokens:]   # the patch tokens the alignment uses
        loss = F.cross_entropy(head(tokens.mean(1)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vit.eval().requires_grad_(False)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    trained = build_demo_vit(DEMO_RESOLUTION, weights=path)
    accuracy = _probe_accuracy(pooled_teacher_tokens(trained, images), labels,
                               pooled_teacher_tokens(trained, held_out), held_out_labels)
    print(f"teacher: held-out linear-probe accuracy on pooled patch tokens {accuracy:.1%} -> {path}")


def train_classifier(images, labels, held_out, held_out_labels, steps: int, path: str) -> None:
    from safetensors.torch import save_file
    from evaluations.demo_metrics import classify, load_classifier
    torch.manual_seed(0)
    model = DemoClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    for index in batches(len(images), 64, steps, seed=3):
        logits, _ = model(images[index])
        loss = F.cross_entropy(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    predicted, _ = classify(load_classifier(path), held_out.permute(0, 2, 3, 1).numpy())
    print(f"classifier: held-out accuracy {float((torch.from_numpy(predicted) == held_out_labels).double().mean()):.1%}"
          f" -> {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEMO_ASSETS, help="output folder (default: %(default)s)")
    parser.add_argument("--only", choices=("vae", "teacher", "classifier"), nargs="+",
                        default=["vae", "teacher", "classifier"], help="what to train (default: all three)")
    parser.add_argument("--images-per-class", type=int, default=200, help="training images (default: %(default)s)")
    parser.add_argument("--held-out-per-class", type=int, default=20, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=1, help="demo_image seed of the training images (held-out: "
                        f"seed + {HELD_OUT_SEED_OFFSET}; default: %(default)s)")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiplies every step count (VAE 3000, teacher 600, classifier 400); "
                             "default: %(default)s")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    images, labels = demo_images(DEMO_NUM_CLASSES * args.images_per_class, args.seed)
    held_out, held_out_labels = demo_images(DEMO_NUM_CLASSES * args.held_out_per_class,
                                            args.seed + HELD_OUT_SEED_OFFSET)
    steps = lambda n: max(1, round(n * args.steps_scale))  # noqa: E731
    if "vae" in args.only:
        train_vae(images, held_out, steps(3000), os.path.join(args.out, "vae"))
    if "teacher" in args.only:
        train_teacher(images, labels, held_out, held_out_labels, steps(600),
                      os.path.join(args.out, "teacher.safetensors"))
    if "classifier" in args.only:
        train_classifier(images, labels, held_out, held_out_labels, steps(400),
                         os.path.join(args.out, "classifier.safetensors"))
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
