"""bench/ on the CPU: the rehearsal runs every part end to end with the figures' arithmetic checked; the runner keeps
the results on disk after each part, records a failing part and goes on, skips what the budget no longer fits, and
--only selects."""
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

import pytest
import torch

from bench import parts as bench_parts
from bench import run as bench_run
from bench.parts import Part
from tests.conftest import ROOT

PEAK = 0.001  # TFLOP/s given to the rehearsal, so that its MFU is computed (CPU rates of toy models: MFU ~ 0.1-10)


def sit_flops(blocks, final=True, projector=False):
    """SiT-Tiny/2 forward on 8x8 latents (64 px), written from the architecture: T = 16 tokens, D = 128, MLP 512,
    256 timestep frequencies, 2x2 patches of 4 channels; the projector D -> 256 -> 256 -> 64 (the tiny teacher's
    width). A multiply-add is 2 FLOPs."""
    T, D, H, F = 16, 128, 512, 256
    return (2 * T * 16 * D + 2 * (F * D + D * D)
            + blocks * (2 * D * 6 * D + 2 * T * D * 3 * D + 2 * T * D * D + 2 * T * 2 * D * H + 4 * T * T * D)
            + final * (2 * D * 2 * D + 2 * T * D * 16) + projector * 2 * T * (D * 256 + 256 * 256 + 256 * 64))


# random-vit-tiny on the 64 px image resized to 56 px: 16 patches of 14 px + CLS, width 64, MLP 256, 2 blocks.
TEACHER = 2 * 16 * 3 * 14 * 14 * 64 + 2 * (2 * 17 * (64 * 192 + 64 * 64 + 2 * 64 * 256) + 4 * 17 * 17 * 64)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """docs/benchmarks.md's rehearsal as a user runs it, with the evaluator's stub network (its FIDs take no minute)
    and a peak, so that MFU is computed."""
    out = tmp_path_factory.mktemp("rehearsal")
    proc = subprocess.run([sys.executable, "-m", "tests.stub_inception", "-m", "bench.run", "--rehearse", "--output",
                           str(out), "--peak-tflops", str(PEAK), "--peak-tflops-fp32", str(PEAK)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / bench_run.JSON_NAME) as f:
        report = json.load(f)
    return {p["name"]: p for p in report["parts"]}, (out / bench_run.TABLE_NAME).read_text()


def test_the_rehearsal_runs_every_part_end_to_end(rehearsal):
    parts, table = rehearsal
    assert list(parts) == [p.name for p in bench_parts.PARTS]
    assert {name: p["status"] for name, p in parts.items()} == {p.name: "ok" for p in bench_parts.PARTS}
    for name, p in parts.items():
        for case, row in p["result"]["rows"].items():
            assert row["rate"] > 0, (name, case)
            assert f"| {name} | {case} | ok |" in table
            if row["flops_per_item"]:
                assert row["mfu"] == pytest.approx(row["rate"] * row["flops_per_item"] / (PEAK * 1e12), rel=1e-12)


def test_training_throughput_is_the_loops_own_after_its_first_window(rehearsal):
    parts, _ = rehearsal
    steps = bench_parts.REHEARSAL.train_steps // bench_parts.REHEARSAL.log_every
    for name in ("train-xl2-phase2", "train-xl2-phase1", "train-b2-phase2"):
        result = parts[name]["result"]
        for case, windows in result["windows"].items():
            assert len(windows) == steps
            assert result["rows"][case]["rate"] == pytest.approx(statistics.mean(windows[1:]), rel=1e-12)
    phase1 = parts["train-xl2-phase1"]["result"]
    assert phase1["cached_over_live_images_per_sec"] == pytest.approx(
        phase1["rows"]["cached teacher tokens"]["rate"] / phase1["rows"]["live teacher"]["rate"], rel=1e-12)


def test_flops_per_item_are_three_sit_forwards_and_the_teacher(rehearsal):
    parts, _ = rehearsal
    flops = {(name, case): row["flops_per_item"] for name, p in parts.items()
             for case, row in p["result"]["rows"].items()}
    phase2 = 3 * sit_flops(4, projector=True) + TEACHER  # the projector on block 3 (XL) or 2 (B): the same FLOPs
    assert flops["train-xl2-phase2", "live teacher"] == flops["train-b2-phase2", "live teacher"] == phase2
    assert flops["train-xl2-phase1", "live teacher"] == 3 * sit_flops(2, final=False, projector=True) + TEACHER
    assert flops["train-xl2-phase1", "cached teacher tokens"] == 3 * sit_flops(2, final=False, projector=True)
    sampler = parts["sampler-xl2"]["result"]["rows"]
    assert sampler["SDE 3 steps, no CFG"]["model_rows_per_sample"] == 3
    for row in sampler.values():
        assert row["flops_per_item"] == row["model_rows_per_sample"] * sit_flops(4)
    assert 3 < sampler["SDE 3 steps, CFG 1.8 on t <= 0.7"]["model_rows_per_sample"] < 6
    (fid,) = parts["fid-xl2"]["result"]["rows"].values()
    assert fid["flops_per_item"] == 2 * sit_flops(4)


def test_the_fid_estimate_extrapolates_the_loops_own_timing(rehearsal):
    parts, _ = rehearsal
    r = parts["fid-xl2"]["result"]
    samples, _ = bench_parts.REHEARSAL.fid
    per_sample = r["sample_seconds"] / samples
    metrics = r["fid_seconds"] - r["sample_seconds"]
    assert r["estimate_10k_1gpu_s"] == pytest.approx(10_000 * per_sample + metrics, abs=0.05)
    assert r["estimate_10k_8gpu_s"] == pytest.approx(1250 * per_sample + metrics, abs=0.05)


# ------------------------------------------------------------------ the runner, on parts of this module

def _row(rate):
    return {"rows": {"case": {"rate": rate, "unit": "items/s", "flops_per_item": None}}}


def _out_of_memory(ctx):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def _refused(ctx):
    raise SystemExit(2)  # how an entry point's argument parser refuses a flag


def _reads_the_results_on_disk(out):
    def run(ctx):
        with open(out / bench_run.JSON_NAME) as f:
            on_disk = {p["name"]: p["status"] for p in json.load(f)["parts"]}
        return {**_row(1.0), "on_disk": on_disk, "table": (out / bench_run.TABLE_NAME).read_text()}
    return run


def _run(out, parts, *flags):
    """bench.run.main over `parts`: (exit status, {name: results entry})."""
    code = bench_run.main(["--rehearse", "--output", str(out), *flags], parts=parts)
    with open(out / bench_run.JSON_NAME) as f:
        return code, {p["name"]: p for p in json.load(f)["parts"]}


def test_a_failing_part_is_recorded_with_its_error_and_the_next_part_runs(tmp_path):
    code, got = _run(tmp_path, [Part("first", "works", 0, lambda ctx: _row(2.0)),
                                Part("oom", "runs out of GPU memory", 0, _out_of_memory),
                                Part("refused", "exits", 0, _refused),
                                Part("after", "reads the results", 0, _reads_the_results_on_disk(tmp_path))])
    assert code == 1
    assert {name: p["status"] for name, p in got.items()} == {"first": "ok", "oom": "failed", "refused": "failed",
                                                              "after": "ok"}
    error = got["oom"]["error"]
    assert (error["type"], error["message"]) == ("OutOfMemoryError", "CUDA out of memory. Tried to allocate 20.00 GiB")
    assert any("_out_of_memory" in line for line in error["traceback"])
    assert (got["refused"]["error"]["type"], got["refused"]["error"]["message"]) == ("SystemExit", "2")
    # Written after each part: the part after the failures found them on disk, and itself not yet done.
    after = got["after"]["result"]
    assert after["on_disk"] == {"first": "ok", "oom": "failed", "refused": "failed", "after": "pending"}
    assert "| first | case | ok |" in after["table"] and "| 2 items/s |" in after["table"]
    assert "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB" in after["table"]


def test_the_budget_skips_the_parts_whose_estimate_no_longer_fits(tmp_path):
    def slow(ctx):
        time.sleep(1.0)
        return _row(1.0)

    code, got = _run(tmp_path, [Part("slow", "takes 1 s", 0.1, slow),
                                Part("too-long", "1 + 2.5 s > 3 s", 2.5, lambda ctx: _row(1.0)),
                                Part("fits", "1 + 0.5 s < 3 s", 0.5, lambda ctx: _row(1.0))], "--budget-s", "3")
    assert code == 0  # a skip is not a failure
    assert {name: p["status"] for name, p in got.items()} == {"slow": "ok", "too-long": "skipped", "fits": "ok"}
    assert "--budget-s 3" in got["too-long"]["reason"] and "result" not in got["too-long"]


def test_only_runs_the_named_parts_in_the_benchmarks_order(tmp_path, capsys):
    code, got = _run(tmp_path, bench_parts.parts_for(rehearse=True), "--only", "data-loading", "sampler-xl2")
    assert code == 0 and list(got) == ["sampler-xl2", "data-loading"]
    assert {p["status"] for p in got.values()} == {"ok"}
    with pytest.raises(SystemExit):
        bench_run.main(["--rehearse", "--output", str(tmp_path), "--only", "nope"])
    assert "--only: invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_benchmark_refuses_and_names_the_rehearsal(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_run.main(["--output", str(tmp_path), "--budget-s", "0"])  # broken, it would skip every part
    assert "no CUDA GPU" in capsys.readouterr().err and not os.listdir(tmp_path)


def test_the_peak_is_looked_up_by_the_gpus_name():
    """NVIDIA's data sheets, dense: H100 SXM 989 bf16 / 67 fp32, H100 PCIe 756 / 51, A100 312 / 19.5. The PCIe part
    must not take the SXM row whose name it contains; an untabulated part gets no guess."""
    assert bench_run.peak_tflops("NVIDIA H100 80GB HBM3") == {"bf16": 989.0, "fp32": 67.0}
    assert bench_run.peak_tflops("NVIDIA H100 PCIe") == {"bf16": 756.0, "fp32": 51.0}
    assert bench_run.peak_tflops("NVIDIA A100-SXM4-80GB") == {"bf16": 312.0, "fp32": 19.5}
    assert bench_run.peak_tflops("NVIDIA H100 NVL") == {"bf16": None, "fp32": None}
    assert bench_run.peak_tflops("NVIDIA GeForce RTX 4090") == {"bf16": None, "fp32": None}


def test_the_commands_in_docs_parse():
    """Every `python -m bench.run ...` of docs/benchmarks.md, in code blocks and inline, parses as typed."""
    with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
        commands = re.findall(r"python -m bench\.run[^`\n]*", f.read())
    assert len(commands) >= 5
    for command in commands:
        bench_run.build_parser().parse_args(shlex.split(command)[3:])
