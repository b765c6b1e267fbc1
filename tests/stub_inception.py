"""The evaluator with test_evaluator's stub Inception (6 live feature dimensions) and its block sqrtm: FID at test
cost. scipy's sqrtm of the real network's 2048 x 2048 covariances takes ~50 s on the CI's 2-core CPU, twice per FID.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.stub_inception train.py FLAGS   # train.py, stubbed
    python -m tests.stub_inception -m bench.run --rehearse --output OUT                         # any script or module
"""
import sys

from evaluations import evaluator
from tests.test_evaluator import StubInception, block_sqrtm


def install(monkeypatch=None) -> None:
    """Replace the network and sqrtm everywhere they are looked up (evaluations.evaluator's attributes)."""
    def load(weights, device):
        return StubInception()
    for name, value in (("load_inception", load), ("_sqrtm", block_sqrtm)):
        if monkeypatch is None:
            setattr(evaluator, name, value)
        else:
            monkeypatch.setattr(evaluator, name, value)


if __name__ == "__main__":
    import runpy
    if len(sys.argv) >= 3 and sys.argv[1] == "-m":
        install()
        sys.argv = sys.argv[2:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    elif len(sys.argv) >= 2 and sys.argv[1].endswith(".py"):
        install()
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        raise SystemExit("usage: python -m tests.stub_inception {SCRIPT.py | -m MODULE} ARGS")
