"""bench/gpu_suite.py on a machine without a GPU: --dry-run prints the plan and the FLOPs per image without
touching CUDA; part selection."""
import os

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


def test_fid_part_runs_on_the_cpu_and_extrapolates_its_own_timing(tmp_path, monkeypatch):
    """The fid-xl2-10k part's code path (FidHook.measure, the timing split, the 10K estimate), on the CPU with a tiny
    SiT, 64 px and the evaluator's stub Inception: what the GPU run will execute, at test cost."""
    import dataclasses

    from tests import stub_inception
    stub_inception.install(monkeypatch)
    monkeypatch.setattr(gpu_suite, "RESOLUTION", 64)
    part = next(p for p in gpu_suite.PARTS if p.name == "fid-xl2-10k")
    tiny = {**part.settings, "model": "SiT-Tiny/2", "num_samples": 3, "num_steps": 2, "precision": "fp32",
            "batch_size": 2}
    ctx = gpu_suite.Context(args=None, work=str(tmp_path), deadline=float("inf"), peak={"fp32": 1.0}, device="cpu")
    r = part.run(ctx, dataclasses.replace(part, settings=tiny))
    per_sample = r["sample_seconds"] / 3
    assert r["samples_timed"] == 3 and per_sample > 0 and r["metrics_seconds"] >= 0
    # The estimates are the per-sample time x 10K (/ 8 GPUs) plus the fixed metric time. They are printed to 0.1 s
    # (error <= 0.05) from the unrounded metric time, which the result reports to 0.01 s (error <= 0.005).
    rounding = 0.05 + 0.005 + 1e-9
    assert r["estimate_10k_1gpu_s"] == pytest.approx(10_000 * per_sample + r["metrics_seconds"], abs=rounding)
    assert r["estimate_10k_8gpu_s"] == pytest.approx(10_000 / 8 * per_sample + r["metrics_seconds"], abs=rounding)
    from bench import flops
    from models.sit import create_sit
    row = flops.sit_forward_flops(create_sit("SiT-Tiny/2", input_size=8, num_classes=1000, z_dims=[]),
                                  with_projectors=False)["total"]
    assert r["flops_per_image"] == 2 * row  # 2 steps, one SiT forward each (no CFG)
    assert os.listdir(tmp_path) == []  # the part's work folder is gone
