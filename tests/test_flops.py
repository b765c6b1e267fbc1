"""bench/flops.py: the analytic FLOP formulas against torch's FlopCounterMode on tiny SiTs and a tiny timm ViT."""
import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.flops import peak_tflops, sit_forward_flops, training_step_flops, vit_forward_flops
from models.sit import SiT, create_sit

TINY = dict(input_size=8, hidden_size=32, num_heads=2, num_classes=10, projector_dim=48)


def _counted(fn):
    """FLOPs FlopCounterMode counts for fn(); attention through the math backend, whose matmuls it sees (the fused
    CPU kernel is not in its table)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _inputs(n, model, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = model.grid_size * model.patch_size
    return (torch.randn(n, model.in_channels, side, side, generator=g), torch.rand(n, generator=g),
            torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("arch", [
    dict(patch_size=2, depth=3, encoder_depth=2, z_dims=[24]),                   # Phase 2, one teacher
    dict(patch_size=4, depth=2, encoder_depth=1, z_dims=[24, 40], mlp_ratio=2),  # two projectors, other MLP width
    dict(patch_size=2, depth=4, encoder_depth=2, z_dims=[24], built_depth=2),   # Phase 1: 2 blocks, no final layer
    dict(patch_size=2, depth=2, encoder_depth=1, z_dims=[]),                     # plain SiT
])
def test_sit_forward_matches_flop_counter(arch):
    torch.manual_seed(0)
    model = SiT(**TINY, **arch)
    x, t, y = _inputs(3, model)
    assert _counted(lambda: model(x, t, y)) == 3 * sit_forward_flops(model)["total"]
    assert _counted(lambda: model(x, t, y, return_projections=False)) == \
        3 * sit_forward_flops(model, with_projectors=False)["total"]


def test_training_step_is_three_forwards_up_to_the_first_layers():
    """Forward + backward as counted = 3 x forward, minus one forward of the two layers whose input needs no
    gradient (the backward computes only their weight gradient). On SiT-XL/2 that difference is < 0.01 %."""
    torch.manual_seed(0)
    model = SiT(**TINY, patch_size=2, depth=2, encoder_depth=1, z_dims=[24])
    x, t, y = _inputs(2, model)

    def step():
        velocity, projections = model(x, t, y)
        (velocity.square().mean() + projections[0].square().mean()).backward()

    parts = sit_forward_flops(model)
    first_layers = parts["patch_embedding"] + 2 * model.t_embedder.frequency_embedding_size * model.pos_embed.shape[-1]
    assert _counted(step) == 2 * (training_step_flops(parts["total"]) - first_layers)
    with torch.device("meta"):
        xl = create_sit("SiT-XL/2", input_size=32, z_dims=[768], encoder_depth=8)
    xl_parts = sit_forward_flops(xl)
    xl_first = xl_parts["patch_embedding"] + 2 * 256 * 1152
    assert xl_first / training_step_flops(xl_parts["total"]) < 1e-4


def test_registry_sizes_against_published_numbers():
    # DiT's table 4 (multiply-adds, "Gflops"): DiT-XL/2 118.6, DiT-B/2 23.0 at 256x256; SiT has the same backbone.
    # Our count adds the projector (not in DiT) and counts a multiply-add as 2 FLOPs.
    with torch.device("meta"):
        for name, published_gmacs in (("SiT-XL/2", 118.6), ("SiT-B/2", 23.0)):
            model = create_sit(name, input_size=32, z_dims=[])
            assert sit_forward_flops(model)["total"] / 2e9 == pytest.approx(published_gmacs, rel=0.01)


def test_teacher_vit_matches_flop_counter():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=56,
                            embed_dim=32, depth=2, num_heads=2)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert _counted(lambda: vit.forward_features(x)) == 2 * vit_forward_flops(vit)["total"]


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == {"bf16": 989.0, "fp32": 67.0}
    assert peak_tflops("NVIDIA H100 PCIe")["bf16"] == 756.0
    assert peak_tflops("NVIDIA H200")["bf16"] == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB")["bf16"] == 312.0
    assert peak_tflops("NVIDIA H100 NVL")["bf16"] is None       # not tabulated: no guess
    assert peak_tflops("NVIDIA GeForce RTX 4090") == {"bf16": None, "fp32": None}
