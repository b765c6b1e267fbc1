"""demo.py, shortened: every stage runs and leaves its outputs, a rerun recomputes nothing that is finished (metrics
included), --table compares SiT, REPA and ERW at the same step budget, and the figures say what they show."""
import json
import os
import re
import subprocess

import numpy as np
import pytest
import scipy.linalg
import yaml
from matplotlib.ticker import MaxNLocator

import demo
from tests.conftest import ROOT


def fast_psd_sqrtm(a, disp=True):
    """sqrtm of a product of two covariance matrices via eigendecomposition (scipy's Schur method takes minutes at
    2048 dims on this CPU). The evaluator's own sqrtm path is tested in tests/test_evaluator.py."""
    vals, vecs = np.linalg.eig(a)
    return (vecs * np.sqrt(vals.astype(complex))) @ np.linalg.inv(vecs)


SHORT = ["--images-per-class", "4", "--phase1-steps", "4", "--phase2-steps", "4", "--num-samples", "20",
         "--sample-steps", "3", "--cknna-layers", "1,2"]
# Short, yet long enough for the samples to show their class: 300 Phase-2 steps on 8 images per class gave 40% class
# accuracy on 40 samples here (the full demo: 81%), in about 30 s.
LEARNS = ["--images-per-class", "8", "--phase1-steps", "20", "--phase2-steps", "300", "--num-samples", "40",
          "--sample-steps", "10", "--cknna-layers", "1"]


def finished_files(root):
    """{path: mtime_ns} of every file under root."""
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


def test_short_demo_runs_every_stage_and_a_rerun_recomputes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(scipy.linalg, "sqrtm", fast_psd_sqrtm)
    out, data = tmp_path / "demo", tmp_path / "data"
    args = ["--out", str(out), "--data-dir", str(data), *SHORT, "--adm-metrics"]
    result = demo.main(args)
    for path in ("phase1/checkpoints/last.pt", "phase2/checkpoints/last.pt", "phase2/samples/0000000.png",
                 "phase2/samples/0000004.png", "losses.png", "samples_by_class.png", "demo_metrics.json",
                 "adm_metrics.json", "cknna.json", "cknna.png"):
        assert os.path.isfile(out / path), path
    assert os.path.isfile(data / "reference.npz")
    metrics = result["metrics"]
    assert metrics["num_samples"] == 20  # its class accuracy: test_the_demos_samples_show_their_class
    assert np.isfinite(metrics["fd_demo"]) and metrics["fd_demo"] >= 0
    with np.load(metrics["samples"]) as samples:  # balanced labels: two of each class
        assert sorted(np.bincount(samples["arr_1"])) == [2] * 10
    summary = capsys.readouterr().out
    assert f"ERW demo done in {result['minutes']:.1f} min" in summary and "class accuracy" in summary

    # The rerun: no training step, no sampling, no metric, no CKNNA; every file as it was.
    before = {**finished_files(out), **finished_files(data)}

    def must_not_run(*args, **kwargs):
        raise AssertionError("the rerun recomputed a finished stage")

    import sample_ddp
    from evaluations import cknna, demo_metrics, evaluator
    for module, name in ((sample_ddp, "main"), (demo_metrics, "demo_metrics"), (cknna, "main"),
                         (evaluator, "evaluate")):
        monkeypatch.setattr(module, name, must_not_run)
    again = demo.main(args)
    after = {**finished_files(out), **finished_files(data)}
    changed = sorted(p for p in before if after.get(p) != before[p])
    # The pictures are redrawn from the logs and the .npz (cheap, the same picture); log.txt and the configs record
    # the rerun, whose phases held their folders' run.lock again.
    assert all(os.path.basename(p) in ("losses.png", "samples_by_class.png", "log.txt", "config.yaml",
                                       "config_history.yaml", "run.lock")
               for p in changed), changed
    assert again["metrics"] == metrics
    with open(out / "phase2" / "metrics.jsonl") as f:
        assert max(json.loads(line)["step"] for line in f) == 4


def test_the_demos_samples_show_their_class(tmp_path):
    result = demo.main(["--out", str(tmp_path / "demo"), "--data-dir", str(tmp_path / "data"), *LEARNS])
    # Well above chance (10%): a generator that ignores the class gets >= 10 of 40 right with probability 0.005
    # (binomial tail); ERW's samples here got 16 of 40, so the bound leaves 6 samples for another CPU's rounding.
    assert result["metrics"]["num_samples"] == 40 and result["metrics"]["class_accuracy"] >= 0.25


def test_table_compares_at_equal_total_steps_and_at_equal_phase2_steps_with_the_compute(tmp_path, capsys):
    out = tmp_path / "demo"
    result = demo.main(["--out", str(out), "--data-dir", str(tmp_path / "data"), "--table", "--table-steps", "8",
                        "--table-evals", "2", "--images-per-class", "4", "--num-samples", "10", "--sample-steps",
                        "2"])
    curves = result["curves"]
    assert list(curves) == list(demo.TABLE_METHODS)
    # Evaluated every 4 optimizer steps; ERW's first 4 are Phase 1, then its Phase 2 runs the whole budget of 8.
    assert [p["total_steps"] for p in curves["SiT"]] == [4, 8] == [p["total_steps"] for p in curves["REPA"]]
    assert [(p["warmup_steps"], p["phase2_steps"], p["total_steps"]) for p in curves["ERW"]] == [(4, 4, 8),
                                                                                               (4, 8, 12)]
    configs = {m: yaml.safe_load((out / "table" / m / "config.yaml").read_text()) for m in demo.TABLE_METHODS}
    assert configs["SiT"]["enc_type"] is None and configs["SiT"]["max_train_steps"] == 8
    assert (configs["REPA"]["align_loss"], configs["REPA"]["proj_decay"], configs["REPA"]["warmup_ckpt"],
            configs["REPA"]["max_train_steps"]) == ("cosine", "none", None, 8)
    assert "ERW-warmup" in configs["ERW"]["warmup_ckpt"] and configs["ERW"]["max_train_steps"] == 8
    # The paper's proportion: a half-life of half the Phase 2 (50K of 100K).
    assert (configs["ERW"]["align_loss"], configs["ERW"]["proj_decay"], configs["ERW"]["proj_half_life"]) == \
        ("ntxent", "exp", 4.0)
    assert len({c["seed"] for c in configs.values()}) == 1
    # Compute from the closed form, written here: per image 3 x the SiT forward (+ the teacher), times the batch.
    # SiT-Tiny/2 on 8x8 latents: T = 16 tokens, D = 128, 4 blocks (ERW's Phase 1: 2), MLP 512; the demo teacher: a
    # 4-block ViT of width 96 (MLP 384) on the 64 px image resized to 56 px, 14 px patches: 16 patches + CLS.
    T, D, H, F = 16, 128, 512, 256
    teacher = 2 * 16 * 3 * 14 * 14 * 96 + 4 * (2 * 17 * (96 * 288 + 96 * 96 + 2 * 96 * 384) + 4 * 17 * 17 * 96)

    def sit(blocks, final=True, projector=0):
        return (2 * T * 16 * D + 2 * (F * D + D * D) + blocks * (2 * D * 6 * D + 2 * T * D * 3 * D + 2 * T * D * D
                + 2 * T * 2 * D * H + 4 * T * T * D) + final * (2 * D * 2 * D + 2 * T * D * 16) + projector)
    projector = 2 * T * (D * 256 + 256 * 256 + 256 * 96)
    per_step = {"SiT": 3 * sit(4) * 32, "REPA": (3 * sit(4, projector=projector) + teacher) * 32}
    warmup = (3 * sit(2, final=False, projector=projector) + teacher) * 32
    for method in ("SiT", "REPA"):
        assert [p["tflop"] for p in curves[method]] == pytest.approx([s * per_step[method] / 1e12 for s in (4, 8)])
    assert [p["tflop"] for p in curves["ERW"]] == pytest.approx(
        [(4 * warmup + s * per_step["REPA"]) / 1e12 for s in (4, 8)])
    lines = (out / "table" / "table.md").read_text().splitlines()
    total, phase2 = [lines[i + 4:i + 7] for i, line in enumerate(lines) if line.startswith("At equal")]
    for rows, erw in ((total, curves["ERW"][0]), (phase2, curves["ERW"][1])):
        assert [row.split("|")[1].strip() for row in rows] == list(demo.TABLE_METHODS)
        for row, point in zip(rows, [curves["SiT"][-1], curves["REPA"][-1], erw]):
            assert f"| {point['fd_demo']:.2f} | {point['class_accuracy']:.1%} | {point['tflop']:.2f} |" in row
    assert "| 4 + 4 |" in total[2] and "| 4 + 8 |" in phase2[2] and "| 8 |" in total[0]
    assert os.path.isfile(out / "table" / "table.png") and result["table"] in capsys.readouterr().out


def axis_texts(axis):
    return axis.get_xlabel(), axis.get_ylabel(), [t.get_text() for t in axis.get_legend().get_texts()]


def test_loss_plot_has_labels_and_says_which_curve_carries_lambda():
    phase1 = [{"step": s, "align_loss": 1.0 / s} for s in (10, 20)]
    phase2 = [{"step": s, "velocity_loss": 1.0, "align_loss": 0.5, "loss": 1.2, "lambda_used": 0.5 / s}
              for s in (10, 20)]
    figure = demo.losses_figure(phase1, phase2)
    for axis in figure.axes:
        xlabel, ylabel, legend = axis_texts(axis)
        assert xlabel and ylabel and legend
    legend = axis_texts(figure.axes[1])[2]
    assert any("unweighted" in text for text in legend) and any("lambda(s) x alignment" in text for text in legend)


def test_cknna_plot_has_integer_layer_ticks_and_one_line_per_checkpoint():
    from evaluations.cknna import alignment_figure
    results = {"phase1": {1: {"cknna": 0.3, "cka": 0.5}, 2: {"cknna": 0.4, "cka": 0.6}},
               "phase2": {1: {"cknna": 0.2, "cka": 0.4}, 2: {"cknna": 0.1, "cka": 0.3}, 3: {"cknna": 0.1, "cka": 0.2}}}
    figure = alignment_figure(results, "title")
    for axis in figure.axes:
        xlabel, ylabel, legend = axis_texts(axis)
        assert "layer" in xlabel and "1-based" in xlabel and ylabel in ("CKNNA", "linear CKA")
        assert legend == ["phase1", "phase2"]
        locator = axis.xaxis.get_major_locator()
        assert isinstance(locator, MaxNLocator)
        figure.canvas.draw()
        assert all(float(t).is_integer() for t in axis.get_xticks())


def test_table_budget_that_does_not_divide_is_refused(tmp_path):
    argv = ["--out", str(tmp_path), "--table", "--table-steps", "10", "--table-evals", "4"]
    with pytest.raises(ValueError, match="--table-steps 10 must be a multiple"):
        demo.main(argv)
    assert not os.listdir(tmp_path)


def readme_tiny_recipe():
    """The commands of README.md's "The tiny setting by hand" block, continuation lines joined."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("### The tiny setting by hand", 1)[1]
    block = re.search(r"\n\n((?: {4}.*\n)+)", section).group(1)
    return [line.strip() for line in re.sub(r"\\\n\s*", "", block).splitlines() if line.strip()]


def test_readme_tiny_recipe_works_as_typed(tmp_path):
    """Each command exactly as the README prints it, in a fresh checkout's layout (the repository's files linked into
    an empty folder, so data/, exps/ and samples/ start empty), in order."""
    commands = readme_tiny_recipe()
    steps = ["make-demo", "train_warmup.py", "train.py", "sample_ddp.py", "reference", "evaluations.demo_metrics",
             "evaluations.cknna"]
    assert len(commands) == len(steps) and all(step in command for step, command in zip(steps, commands)), commands
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in os.listdir(ROOT):
        if name not in (".git", "data", "exps", "samples") and not name.startswith("."):
            os.symlink(os.path.join(ROOT, name), checkout / name)
    env = {**os.environ, "WANDB_MODE": "offline"}
    outputs = []
    for command in commands:
        assert command.startswith("python ")
        result = subprocess.run(command, shell=True, cwd=checkout, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)
    assert "class accuracy:" in outputs[5] and "FD-demo" in outputs[5]
    assert os.path.isfile(checkout / "exps" / "tiny-cknna" / "cknna.json")
    with np.load(next((checkout / "samples" / "tiny").glob("*.npz"))) as samples:
        assert samples["arr_0"].shape == (100, 64, 64, 3)
