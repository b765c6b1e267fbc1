"""bench/gpu_suite.py without a GPU: the plan, the rehearsal of every part on the CPU, and a suite that keeps every
result when parts fail, hang, exit or the suite itself is stopped by a real signal."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bench import gpu_parts, gpu_suite
from bench.gpu_parts import Part
from tests.conftest import ROOT


def test_dry_run_lists_every_part_without_touching_cuda(monkeypatch, capsys):
    def no_cuda(*args, **kwargs):
        raise AssertionError("--dry-run touched CUDA")

    for name in ("_lazy_init", "get_device_name", "synchronize"):  # what a CUDA context would need
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    assert gpu_suite.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for part in gpu_parts.PARTS:
        assert part.name in out
    for model in ("SiT-B/2 Phase 2", "SiT-XL/2 Phase 2", "SiT-XL/2 Phase 1 (k=5)", "dinov2-vit-b", "Inception"):
        assert model in out and "GFLOP" in out


def test_part_selection():
    names = lambda parts: [p.name for p in parts]  # noqa: E731
    select = lambda only, skip: names(gpu_suite.select_parts(gpu_parts.PARTS, only, skip))  # noqa: E731
    assert select(None, []) == names(gpu_parts.PARTS)
    assert select(["tests"], []) == ["env", "data", "tests"]            # the tests need the data, env is always there
    assert select(["sampler-xl2"], []) == ["env", "sampler-xl2"]
    bench = select(["bench"], ["evaluator-50k"])
    assert "evaluator-50k" not in bench and "tests" not in bench and bench[:2] == ["env", "data"]
    with pytest.raises(SystemExit, match="unknown part"):
        select(["nope"], [])


def test_the_fid_estimate_leaves_the_first_batchs_one_off_cost_out_of_the_rate():
    # Batches of 4 at 0.5 s per sample, the first with 3 s of one-off work: 10K samples cost 5000 s + 3 s + metrics.
    seconds, sizes = [3 + 4 * 0.5] + [4 * 0.5] * 5, [4] * 6
    r = gpu_parts.fid_estimate(seconds, sizes, metrics_s=7.0, n=10_000, gpus=8)
    assert r["per_sample_s"] == pytest.approx(0.5) and r["first_batch_one_off_s"] == pytest.approx(3.0)
    assert r["estimate_10k_1gpu_s"] == pytest.approx(5000 + 3 + 7, abs=0.05)
    assert r["estimate_10k_8gpu_s"] == pytest.approx(5000 / 8 + 3 + 7, abs=0.05)
    with pytest.raises(ValueError, match="at least two timed batches"):
        gpu_parts.fid_estimate([1.0], [4], 0.0, 10_000, 8)


# ------------------------------------------------------------------ the rehearsal: every part on the CPU

@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """`--rehearse` as a user runs it (a process of its own; the evaluator's stub network and sqrtm, so that its
    FIDs take no minute), its temp folders under a folder of the test's own."""
    out, temp = tmp_path_factory.mktemp("rehearsal-out"), tmp_path_factory.mktemp("rehearsal-tmp")
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "tests.stub_inception", "-m", "bench.gpu_suite", "--rehearse",
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TMPDIR": str(temp)})
    with open(out / gpu_suite.RESULTS_NAME) as f:
        report = json.load(f)
    return proc, report, out, temp, time.time() - start


def test_the_rehearsal_runs_every_part_end_to_end(rehearsal):
    proc, report, out, temp, seconds = rehearsal
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = {p["name"]: p for p in report["parts"]}
    assert list(parts) == [p.name for p in gpu_parts.PARTS]
    assert {name: p["status"] for name, p in parts.items() if p["status"] != "ok"} == {}
    assert report["missing"] == [] and report["suite"]["status"] == "finished" and report["suite"]["rehearse"]
    for name in ("train-xl2-phase2", "train-xl2-phase1", "train-b2-phase2", "train-b2-phase2-compile"):
        r = parts[name]["result"]
        assert r["images_per_sec"] > 0 and r["flops_per_image"] > 0 and len(r["images_per_sec_by_window"]) == 2
    assert set(parts["sampler-xl2"]["result"]["cases"]) == {"no-cfg", "cfg-interval"}
    assert parts["evaluator-50k"]["result"]["n_samples"] == gpu_parts.REHEARSAL.evaluator["n_samples"]
    cache = parts["teacher-cache-xl2"]["result"]
    assert cache["live_teacher_step_s"] > 0 and cache["cached_tokens_step_s"] > 0 and cache["cached_over_live"] > 0
    tests = {t["test"]: t["status"] for t in parts["tests"]["result"]["tests"]}
    assert tests and set(tests.values()) == {"passed"}, tests
    assert "test_sampling_steps_do_not_synchronize" in tests and "test_phase1_phase2_resume[fp16-eager]" in tests
    # The FID estimate from its own batch timings (fid_estimate's formula, recomputed): printed to 0.1 s.
    fid = parts["fid-xl2-10k"]["result"]
    t, n = fid["batch_seconds"], fid["batch_sizes"]
    per_sample = sum(t[1:]) / sum(n[1:])
    expected = 10_000 * per_sample + (t[0] - per_sample * n[0]) + fid["metrics_seconds"]
    # batch times are reported to 1e-4 s (x 10K / 2 samples each: <= 0.5 s each) and the metric time to 1e-3 s
    assert fid["estimate_10k_1gpu_s"] == pytest.approx(expected, abs=0.05 + 5e-5 * 10_000 * len(t) + 5e-4)
    assert sorted(os.listdir(out)) == sorted([gpu_suite.RESULTS_NAME, gpu_suite.TABLE_NAME, gpu_suite.LOG_NAME,
                                              gpu_parts.JUNIT_NAME, gpu_parts.PROFILE_NAME])
    with open(out / gpu_parts.PROFILE_NAME) as f:
        assert "matmul" in f.read()
    assert os.listdir(temp) == []  # the default work folder is removed
    print(f"rehearsal: {seconds:.0f} s", file=sys.__stdout__)


# ------------------------------------------------------------------ failures: what is kept

def _ok(ctx, part):
    return {"value": part.name}


def _raises(ctx, part):
    raise RuntimeError("a part that fails")


def _exits(ctx, part):
    sys.exit(3)


def _checks_the_file_is_current(ctx, part):
    """Runs after the failures: the results on disk already hold them, and this part as running."""
    with open(os.path.join(ctx.output, gpu_suite.RESULTS_NAME)) as f:
        on_disk = {p["name"]: p["status"] for p in json.load(f)["parts"]}
    return {"on_disk": on_disk}


def _hangs(ctx, part):
    time.sleep(600)


def _ignores_sigint(ctx, part):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(600)


def _sigterms_the_suite(ctx, part):
    os.kill(os.getppid(), signal.SIGTERM)  # as a scheduler or a command timeout would
    time.sleep(600)


def _fake(name, run, estimate_s=0.1, limit_s=3.0):
    return Part(name, "bench", estimate_s, f"fake part {name}", run, limit_s=limit_s)


@pytest.fixture
def fake_suite(monkeypatch, tmp_path):
    """gpu_suite.main on parts of this module (forked from this process: they run no torch work), with short grace
    periods; returns (run(parts, *flags) -> exit code, output folder)."""
    monkeypatch.setattr(gpu_suite, "GRACE_S", 1.0)
    monkeypatch.setattr(gpu_suite, "RESERVE_S", 0.5)
    monkeypatch.setattr(gpu_parts, "preload", lambda: {})
    out = tmp_path / "out"

    def run(parts, *flags):
        monkeypatch.setattr(gpu_parts, "PARTS", parts)
        # The budget's clock starts now, not when this test process did.
        return gpu_suite.main(["--rehearse", "--output", str(out), "--work-dir", str(tmp_path / "work"), *flags],
                              started_at=time.time())

    return run, out


def _report(out):
    with open(out / gpu_suite.RESULTS_NAME) as f:
        return json.load(f)


def test_every_part_before_and_after_a_failure_is_kept(fake_suite):
    run, out = fake_suite
    parts = [_fake("env", _ok), _fake("first", _ok), _fake("raises", _raises), _fake("exits", _exits),
             _fake("second", _checks_the_file_is_current), _fake("hangs", _hangs, limit_s=1.0),
             _fake("ignores-sigint", _ignores_sigint, limit_s=1.0), _fake("third", _ok)]
    assert run(parts) == 1
    report = _report(out)
    got = {p["name"]: p for p in report["parts"]}
    assert {k: p["status"] for k, p in got.items()} == {
        "env": "ok", "first": "ok", "raises": "failed", "exits": "failed", "second": "ok", "hangs": "interrupted",
        "ignores-sigint": "killed", "third": "ok"}
    assert got["first"]["result"] == {"value": "first"} and got["third"]["result"] == {"value": "third"}
    assert "RuntimeError: a part that fails" in got["raises"]["error"] and "SystemExit: 3" in got["exits"]["error"]
    assert got["exits"]["exit"] == "code 3"
    # Written before "second" started: the failures were on disk, and "second" as running.
    assert got["second"]["result"]["on_disk"] == {"env": "ok", "first": "ok", "raises": "failed",
                                                  "exits": "failed", "second": "running", "hangs": "pending",
                                                  "ignores-sigint": "pending", "third": "pending"}
    assert got["hangs"]["stopped"] == "deadline: 1 s" and "KeyboardInterrupt" in got["hangs"]["error"]
    assert got["ignores-sigint"]["exit"] == "signal SIGKILL" and "grace period" in got["ignores-sigint"]["error"]
    assert [m["part"] for m in report["missing"]] == ["raises", "exits", "hangs", "ignores-sigint"]
    assert report["suite"]["status"] == "finished; failed: raises, exits, hangs, ignores-sigint"


def test_the_budget_bounds_the_suite_and_skips_what_no_longer_fits(fake_suite):
    run, out = fake_suite
    parts = [_fake("env", _ok), _fake("hangs", _hangs, limit_s=60.0), _fake("later", _ok)]
    start = time.time()
    assert run(parts, "--budget-s", "6") == 1
    report = _report(out)
    got = {p["name"]: p for p in report["parts"]}
    assert got["hangs"]["status"] == "interrupted" and got["hangs"]["elapsed_s"] < 6
    assert got["later"]["status"] == "skipped" and "of the budget left" in got["later"]["reason"]
    assert time.time() - start < 6 + 2  # the budget, plus the grace period


def test_sigterm_to_the_suite_stops_the_part_and_keeps_the_results(fake_suite):
    run, out = fake_suite
    parts = [_fake("env", _ok), _fake("first", _ok), _fake("stopped", _sigterms_the_suite, limit_s=60.0),
             _fake("never", _ok)]
    handler = signal.getsignal(signal.SIGTERM)
    assert run(parts) == gpu_suite.EXIT_STOPPED == 75
    report = _report(out)
    got = {p["name"]: p for p in report["parts"]}
    assert got["first"]["status"] == "ok"
    assert got["stopped"]["status"] == "interrupted" and "SIGTERM" in got["stopped"]["stopped"]
    assert got["never"]["status"] == "not run" and "SIGTERM" in got["never"]["reason"]
    assert report["suite"]["status"] == "stopped by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == handler  # the suite's handler is gone again


def test_the_output_is_named_and_the_work_folder_is_outside_the_repository(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_suite.main(["--work-dir", str(tmp_path / "work")])
    assert "--output DIR is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_suite.main(["--output", str(tmp_path), "--work-dir", os.path.join(ROOT, "scratch")])
    assert "is inside the repository" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(ROOT, "scratch"))


def _wheel(folder, name, version):
    """A minimal pure-Python wheel of a package `name` whose module holds VERSION."""
    import zipfile
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for member, text in files.items():
            z.writestr(member, text)
    return path


def test_wheels_install_what_is_missing_and_keep_what_is_there(tmp_path, monkeypatch):
    folder, site = tmp_path / "wheels", tmp_path / "site"
    folder.mkdir()
    _wheel(folder, "erw_missing_pkg", "0.1")
    _wheel(folder, "pytest", "0.0.1")  # installed here: kept, never downgraded
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    done = gpu_suite.install_wheels(str(folder), str(site))
    assert done["installed"] == ["erw_missing_pkg-0.1-py3-none-any.whl"]
    assert done["present"] == [f"pytest {pytest.__version__} (kept)"]
    assert sys.path[0] == str(site) and os.environ["PYTHONPATH"] == str(site)
    assert os.listdir(site / "erw_missing_pkg") == ["__init__.py"] and not os.path.exists(site / "pytest")
    with pytest.raises(SystemExit, match="no .whl files"):
        gpu_suite.install_wheels(str(tmp_path), str(site))


def test_a_suite_that_loaded_the_cuda_driver_spawns_its_parts(fake_suite, monkeypatch):
    """After cuInit (a library calling torch.cuda.is_available() on import) a forked part could not use CUDA: the
    suite then runs each part in a fresh interpreter (bench/gpu_parts.py's child_main), with the same result."""
    from bench import part_runner
    run, out = fake_suite
    monkeypatch.setattr(part_runner, "cuda_driver_loaded", lambda: True)
    assert run(gpu_parts.PARTS, "--only", "env") == 0
    (env,) = _report(out)["parts"]
    assert env["status"] == "ok" and env["isolation"] == "spawn"
    assert env["result"]["torch"] == torch.__version__ and env["result"]["flop_table"]


def test_a_spawned_part_is_stopped_at_its_deadline_and_keeps_its_output(tmp_path):
    from bench import part_runner
    result = str(tmp_path / "result.json")
    command = [sys.executable, "-c", "import time; from bench.part_runner import run_and_record; print('started', "
               f"flush=True); raise SystemExit(run_and_record(time.sleep, (60,), {result!r}))"]
    lines = []
    # The grace period is generous because a loaded machine (CI's 2 cores under the rest of the suite) may take
    # seconds to run the child's exit path; the child uses it only as long as it needs. SIGINT is ignored here while
    # the child starts, as it is in a process whose parent ignored it: a part must still stop at its deadline.
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        outcome = part_runner.run_part(None, (), limit_s=5.0, grace_s=30.0, result_path=result, emit=lines.append,
                                       spawn=command, spawn_cwd=ROOT)
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert outcome.status == "interrupted" and outcome.stopped == "deadline: 5 s" and "KeyboardInterrupt" in \
        outcome.error, (outcome.status, outcome.stopped, outcome.error)
    assert lines[0] == "started\n" and outcome.elapsed_s < 5 + 30


def _trajectory_checkpoints(seed=0, params=4000, m=20):
    """Checkpoints of a fake N + M run on a noisy GPU: weights at N, M updates of ~equal size, two straight runs
    that differ by run-to-run noise (2 % of the last M steps' movement)."""
    g = torch.Generator().manual_seed(seed)
    w_n = torch.randn(params, generator=g, dtype=torch.float64)
    updates = [1e-2 * torch.randn(params, generator=g, dtype=torch.float64) for _ in range(m)]
    moved = float(sum(updates).norm())

    def noise():
        return 0.02 * moved / params ** 0.5 * torch.randn(params, generator=g, dtype=torch.float64)

    def ckpt(weights, skipped):
        return {"model": {"w": weights}, "ema": {"w": weights}, "opt": {}, "scaler": {}, "skipped_steps": skipped}

    straight = ckpt(w_n + sum(updates), 0)
    straight2 = ckpt(w_n + sum(updates) + noise(), 0)
    return w_n, updates, straight, straight2, ckpt, noise


def test_resume_check_allows_a_gradscaler_skip_and_catches_a_lost_state():
    """tests/test_gpu.py's resume check on a noisy GPU: a resumed run whose fp16 GradScaler skipped one update more
    than the straight run (its weights one update behind) is fine; one that lost its state is not."""
    from tests.test_gpu import resume_disagreement
    m = 20
    w_n, updates, straight, straight2, ckpt, noise = _trajectory_checkpoints(m=m)
    at_n, before_last = {"w": w_n}, {"w": w_n + sum(updates[:-1])}
    one_more_skip = ckpt(w_n + sum(updates[1:]) + noise(), 1)
    assert resume_disagreement(straight, straight2, one_more_skip, at_n, before_last) is None
    # The same weights reported without the skip: one update off is too much for run-to-run noise alone.
    assert "resumed run off by" in resume_disagreement(straight, straight2, {**one_more_skip, "skipped_steps": 0},
                                                       at_n, before_last)
    g = torch.Generator().manual_seed(1)  # optimizer moments lost: the M updates go elsewhere
    lost = ckpt(w_n + sum(1e-2 * torch.randn(w_n.shape, generator=g, dtype=torch.float64) for _ in range(m)), 0)
    assert "resumed run off by" in resume_disagreement(straight, straight2, lost, at_n, before_last)
    # A deterministic GPU: bit for bit, or named.
    assert resume_disagreement(straight, straight, straight, at_n, before_last) is None
    assert "the resumed model, ema differ" in resume_disagreement(straight, straight, straight2, at_n, before_last)


SLOW_TESTS = '''
import signal, time
import pytest
pytestmark = pytest.mark.gpu

def test_quick():
    pass

def test_slow():
    if {ignore}:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(60)
'''


@pytest.mark.parametrize("ignore_sigint", [False, True], ids=["sigint", "sigkill"])
def test_the_tests_that_finished_before_the_deadline_are_kept(fake_suite, monkeypatch, tmp_path, ignore_sigint):
    """The real tests part on a test file whose second test outlasts the deadline: SIGINT lets pytest write its
    JUnit XML; a run that ignores SIGINT is killed, and its per-test log still says what passed."""
    run, out = fake_suite
    tests_file = tmp_path / "test_slow_gpu.py"
    tests_file.write_text(SLOW_TESTS.format(ignore=ignore_sigint))
    monkeypatch.setattr(gpu_parts, "GPU_TESTS", str(tests_file))
    monkeypatch.setattr(gpu_suite, "GRACE_S", 5.0)
    # 6 s: pytest starts and passes test_quick well before, test_slow is still sleeping.
    tests = Part("tests", "tests", 0.1, "fake GPU tests", gpu_parts.run_tests, limit_s=6.0,
                 salvage=gpu_parts.salvage_tests)
    assert run([_fake("env", _ok), tests]) == 1
    (_, part) = _report(out)["parts"]
    assert part["status"] == ("killed" if ignore_sigint else "interrupted")
    assert part["result"]["tests"][0] == {"test": "test_quick", "status": "passed", "seconds": 0.0}
    assert os.path.exists(out / gpu_parts.JUNIT_NAME) != ignore_sigint


def test_a_package_missing_for_the_flop_table_fails_env_only(fake_suite, monkeypatch):
    """What the FLOP table needs (timm) is imported inside the env part: without it the suite still runs the rest."""
    run, out = fake_suite

    def no_timm(scale):
        raise ModuleNotFoundError("No module named 'timm'")

    monkeypatch.setattr(gpu_parts, "flop_table", no_timm)
    env = next(p for p in gpu_parts.PARTS if p.name == "env")
    assert run([env, _fake("after", _ok)]) == 1
    got = {p["name"]: p for p in _report(out)["parts"]}
    assert got["env"]["status"] == "failed" and "No module named 'timm'" in got["env"]["error"]
    assert got["after"]["status"] == "ok"
