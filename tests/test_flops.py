"""FLOPs as torch's FlopCounterMode counts them (bench/ and demo.py count this way) against the published counts of
the DiT models, which the SiT sizes share."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.sit import create_sit

# DiT (Peebles & Xie, 2023) at 256x256 (32x32 latents), forward "Gflops" as its tables print them: table 4 for patch
# 2, table 1 for patch 4. DiT counts a multiply-add as one FLOP; FlopCounterMode counts it as two.
PUBLISHED_GMACS = {"SiT-XL/2": 118.6, "SiT-B/2": 23.0, "SiT-XL/4": 29.1, "SiT-L/4": 19.7, "SiT-B/4": 5.6,
                   "SiT-S/4": 1.4}


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_the_sit_forward_counts_twice_the_published_multiply_adds(name):
    with torch.device("meta"):  # nothing allocated or computed
        model = create_sit(name, input_size=32, z_dims=[])  # no projector: DiT has none
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 4, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    # Published to 3 significant digits (1.4: 2); 1 % covers the rounding of the two-digit ones.
    assert counter.get_total_flops() / 2e9 == pytest.approx(PUBLISHED_GMACS[name], rel=0.01)
