"""bench/gpu_suite.py on a machine without a GPU: --dry-run prints the plan and the FLOPs per image without
touching CUDA; part selection."""
import pytest
import torch

from bench import gpu_suite


def test_dry_run_lists_every_part_without_touching_cuda(monkeypatch, capsys):
    def no_cuda(*args, **kwargs):
        raise AssertionError("--dry-run touched CUDA")

    for name in ("_lazy_init", "get_device_name", "synchronize"):  # what a CUDA context would need
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    assert gpu_suite.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for part in gpu_suite.PARTS:
        assert part.name in out
    for model in ("SiT-B/2 Phase 2", "SiT-XL/2 Phase 2", "SiT-XL/2 Phase 1 (k=5)", "DINOv2-B", "Inception"):
        assert model in out and "GFLOP" in out


def test_part_selection():
    names = lambda parts: [p.name for p in parts]  # noqa: E731
    everything = names(gpu_suite.select_parts(None, []))
    assert everything == [p.name for p in gpu_suite.PARTS] and everything[-1] == "train-xl2-phase2-compile"
    assert names(gpu_suite.select_parts(["tests"], [])) == ["data", "tests"]            # the tests need the data
    assert names(gpu_suite.select_parts(["sampler-xl2"], [])) == ["sampler-xl2"]
    bench = names(gpu_suite.select_parts(["bench"], ["evaluator-50k"]))
    assert "evaluator-50k" not in bench and "tests" not in bench and bench[0] == "data"
    with pytest.raises(SystemExit, match="unknown part"):
        gpu_suite.select_parts(["nope"], [])
