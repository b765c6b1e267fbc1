"""A shortened demo.py run: every stage runs and leaves its outputs; a second run resumes."""
import json
import os

import numpy as np
import scipy.linalg

import demo


def fast_psd_sqrtm(a, disp=True):
    """sqrtm of a product of two covariance matrices via eigendecomposition (scipy's Schur method takes minutes at
    2048 dims on this CPU). The evaluator's own sqrtm path is tested in tests/test_evaluator.py."""
    vals, vecs = np.linalg.eig(a)
    return (vecs * np.sqrt(vals.astype(complex))) @ np.linalg.inv(vecs)


def test_short_demo_runs_every_stage_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(scipy.linalg, "sqrtm", fast_psd_sqrtm)
    out = tmp_path / "demo"
    args = ["--out", str(out), "--images-per-class", "4", "--phase1-steps", "4", "--phase2-steps", "4",
            "--num-samples", "20", "--sample-steps", "3", "--cknna-layers", "1,2"]
    result = demo.main(args)
    for path in ("phase1/checkpoints/last.pt", "phase2/checkpoints/last.pt", "phase2/samples/0000000.png",
                 "phase2/samples/0000004.png", "losses.png", "metrics.json", "cknna.json", "cknna.png",
                 "reference.npz"):
        assert os.path.isfile(out / path), path
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert {"fid", "sfid", "inception_score", "precision", "recall"} <= set(metrics)
    assert np.isfinite(result["metrics"]["fid"])
    # A second run resumes: the finished phases train no further steps and every output is still there.
    demo.main(args)
    with open(out / "phase2" / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert max(steps) == 4
