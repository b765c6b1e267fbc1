"""GPU tests: the fast path is the tested path. Opt-in, `python -m pytest -m gpu tests/test_gpu.py` (minutes on one
GPU); skipped without CUDA, and on a GPU machine unless `-m gpu` selects them. With ERW_GPU_REHEARSE=1 the same tests
run on the CPU at toy sizes (tests/test_gpu_checks.py does it in CI): SiT-Tiny/2, the random tiny teacher, 64 px, a
few steps, one chain; that proves the tests' own code runs, not what they check (there is no loss to fall in 4 steps,
no GPU to synchronize with).

The real architectures with random weights at 256 px (32x32 latents), through the public entry points only:
SiT-B/2 with the DINOv2-B/14 teacher (`random-dinov2-vit-b`), SD-VAE's architecture (`random-sd-vae`) and the
evaluator's Inception network (`--inception-weights random`), on the generated demo data at 256 px.

- Phase 1 -> Phase 2 warm start -> resume, in bf16 and fp16, each eager and with --compile: losses finite and
  falling; N + M steps straight = N steps, then --resume for M (bit for bit when the GPU is deterministic).
- Between log and checkpoint steps, a training step never synchronizes the GPU with the host; neither does a
  sampling step (SDE, per-sample noise, CFG interval).
- sample_ddp.py end to end into an .npz; the evaluator on the GPU agrees with the same evaluation on the CPU.
"""
import gc
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

REHEARSAL = os.environ.get("ERW_GPU_REHEARSE") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() or REHEARSAL),
                                                  reason="needs a CUDA GPU")]

# The paper's SiT-B/2 setting (table 4: ERW depth 8, projector on block 8), made small where it costs time only.
CONFIG = os.path.join(ROOT, "configs", "table4_sit_b2_erw.yaml")
if REHEARSAL:
    MODEL, WARMUP_DEPTH, RESOLUTION, TEACHER, DEVICE, BATCH = "SiT-Tiny/2", 2, 64, "random-vit-tiny", "cpu", 4
else:
    MODEL, WARMUP_DEPTH, RESOLUTION, TEACHER, DEVICE, BATCH = "SiT-B/2", 8, 256, "random-dinov2-vit-b", "cuda", 32
BIG = 10 ** 6                      # "never" for log / checkpoint / sample-grid intervals
# Learning rate 3e-4 (3x the paper's): the Phase-2 velocity loss then falls clearly within 40 steps. Both losses
# were checked on the CPU with SiT-B/2 and the DINOv2-B teacher at 64 px (same data, fp32): Phase 1 (NT-Xent over 32
# images, ln 32 = 3.47 at start) 3.43 -> 2.70 in 40 steps at lr 1e-4; Phase 2 velocity loss (the fresh final layer
# predicts v = 0: E|eps - x|^2 ~ 2 at start) 1.90 at step 4 -> 1.47-1.63 over steps 28-40 at lr 3e-4.
LR = "3e-4"
P1_STEPS, P1_LOG = (4, 2) if REHEARSAL else (60, 5)
N, M, P2_LOG = (2, 2, 1) if REHEARSAL else (20, 20, 2)  # Phase 2: N + M steps straight; N, then --resume to N + M
# Required fall: the mean of the last third of the logged losses at least 10 % below the mean of the first two
# records (the CPU runs above fell by 20-25 %). Each record is one batch of 32 (velocity loss: +-4 % batch to batch).
FALL = 0.10
SYNC_START, SYNC_STOP = (1, 3) if REHEARSAL else (5, 35)  # micro-batches watched for host syncs, after warm-up
SYNC_PROBES = {}                   # (precision, compiled) -> the ObjectiveProbe of that chain's watched run
# The rehearsal runs one chain, with loss scaling (tests/test_training_paths.py trains with --compile on the CPU).
CHAINS = [("fp16", False)] if REHEARSAL else [("bf16", False), ("fp16", False), ("bf16", True), ("fp16", True)]
CHAIN_IDS = [f"{p}-{'compile' if c else 'eager'}" for p, c in CHAINS]
# Sizes of the sampling and evaluator tests: (samples, batch, steps) and (samples, references, image side).
SAMPLE_DDP = (5, 2, 2) if REHEARSAL else (40, 16, 10)  # 40: not a multiple of the batch, the last one is partial
# SD-VAE's architecture; the rehearsal decodes with the tiny random VAE (SD-VAE's is slow on a CPU).
SAMPLE_VAE = "random-tiny" if REHEARSAL else "random-sd-vae"
EVALUATOR = (6, 8, 64) if REHEARSAL else (48, 64, 256)


@pytest.fixture(scope="module", autouse=True)
def _opt_in(request):
    """Before any module fixture (the data): these tests cost GPU minutes, so `pytest tests` skips them."""
    if "gpu" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("GPU tests are opt-in (minutes of GPU time): select them with `pytest -m gpu`")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The demo dataset at RESOLUTION (10 classes x 16 images), encoded by the random tiny VAE."""
    from preprocessing import dataset_tools
    dest = str(tmp_path_factory.mktemp("demo"))
    dataset_tools.main(["make-demo", "--dest", dest, "--resolution", str(RESOLUTION), "--images-per-class", "16",
                        "--vae", "random-tiny"])
    return dest


@pytest.fixture
def runs(tmp_path):
    """Experiment folders for one test (checkpoints: up to ~10 GB), in RAM-backed /dev/shm when it has room, so the
    runs do not wait for a disk; removed afterwards."""
    import tempfile
    shm = "/dev/shm"
    if os.path.isdir(shm) and shutil.disk_usage(shm).free > 24 * 2 ** 30:
        folder = tempfile.mkdtemp(prefix="erw-gpu-test-", dir=shm)
    else:
        folder = str(tmp_path / "runs")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _common(data, out, precision, compiled):
    return ["--config", CONFIG, "--model", MODEL, "--warmup-depth", str(WARMUP_DEPTH), "--data-dir", data,
            "--output-dir", str(out), "--resolution", str(RESOLUTION),
            "--enc-type", TEACHER, "--batch-size", str(BATCH), "--learning-rate", LR,
            "--mixed-precision", precision, "--compile" if compiled else "--no-compile",
            "--num-workers", "0" if REHEARSAL else "4", "--report-to", "none",
            "--checkpointing-steps", str(BIG)]


def _phase2(data, warmup_ckpt):
    # Sample grids decode with the demo's own tiny VAE: the grid at step 0 and at the end, 4 images, 2 steps.
    # Without a warm start the head needs a block number (the config's encoder_depth auto points at warmed blocks).
    return ["--warmup-ckpt", warmup_ckpt or "none", *([] if warmup_ckpt else ["--encoder-depth", str(WARMUP_DEPTH)]),
            "--vae", os.path.join(data, "vae"), "--sample-grid-every", str(BIG), "--sample-grid-size", "4",
            "--sample-num-steps", "2"]


def _train(entry, argv):
    """Run an entry point in this process, compiled code from earlier runs forgotten as in a new process; return its
    log records, and free the GPU for the next run."""
    import torch._dynamo
    torch._dynamo.reset()  # in-memory compile caches only: inductor's cache on disk stays
    result = entry.main(argv)
    history = result["history"]
    del result
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return history


def _fail_on_recompile_limit(monkeypatch):
    """Past torch._dynamo's recompile limit a function silently runs eagerly: in these tests it is an error."""
    import torch._dynamo
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)


def _check_learns(history, key, fall, what):
    """Every logged loss finite (not grad_norm: an fp16 step that overflows logs inf and is skipped); `key` falls."""
    bad = [(r["step"], k, v) for r in history for k, v in r.items() if k.endswith("loss") and not math.isfinite(v)]
    assert history and not bad, f"{what}: non-finite losses (step, name, value): {bad}"
    values = [r[key] for r in history]
    first, last = np.mean(values[:2]), np.mean(values[-max(1, len(values) // 3):])
    assert last < (1 - fall) * first, f"{what}: {key} did not fall by {fall:.0%}: {[round(v, 4) for v in values]}"
    skipped = history[-1].get("skipped_steps", 0)
    assert skipped <= history[-1]["step"] // 4, f"{what}: {skipped} of {history[-1]['step']} updates skipped"


def _tensors(tree, prefix=""):
    """Flatten a checkpoint entry (state dicts, optimizer state, scaler state) to {path: tensor or value}."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _tensors(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _tensors(sub, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def _bitwise_equal(a, b):
    fa, fb = _tensors(a), _tensors(b)
    if fa.keys() != fb.keys():
        return False
    return all(torch.equal(x, fb[k]) if isinstance(x, torch.Tensor) else x == fb[k] for k, x in fa.items())


def _distance(a, b):
    """L2 distance between two model state dicts over all floating-point tensors, in float64."""
    return math.sqrt(sum(float((a[k].double() - b[k].double()).square().sum()) for k in a if a[k].is_floating_point()))


def resume_disagreement(straight, straight2, resumed, at_n, before_last):
    """Why a run resumed at step N does not continue the straight run of N + M steps, or None when it does.
    straight, straight2: the last checkpoints of two identical straight runs; resumed: the resumed run's; at_n: the
    model weights it resumed from; before_last: the straight run's model weights one update before its end.

    GPU kernels are deterministic for fixed shapes unless they accumulate with atomics (flash attention's backward),
    so the two straight runs measure the run-to-run noise first. Bitwise equal: the resumed run must equal them bit
    for bit (model, EMA, optimizer, loss scale). Not equal: distances are fractions of how far the weights moved in
    the last M steps. The resumed run may be off by 3x what the two straight runs differ by, plus two updates (the
    last one's size, measured) per fp16 GradScaler skip it made more or fewer than the straight run: on a noisy GPU
    one run can overflow where the other does not, and a skipped update leaves the weights one update behind. A
    resume that loses state (optimizer moments, loss scale, data position) is off by a fraction ~1."""
    keys = [k for k in ("model", "ema", "opt", "scaler") if straight.get(k) is not None]
    if all(_bitwise_equal(straight[k], straight2[k]) for k in keys):
        differ = [k for k in keys if not _bitwise_equal(straight[k], resumed[k])]
        return f"deterministic GPU, but the resumed {', '.join(differ)} differ" if differ else None
    moved = _distance(straight["model"], at_n)
    noise = _distance(straight["model"], straight2["model"]) / moved
    off = _distance(straight["model"], resumed["model"]) / moved
    update = _distance(straight["model"], before_last) / moved
    skips = abs(resumed.get("skipped_steps", 0) - straight.get("skipped_steps", 0))
    noise_skips = abs(straight2.get("skipped_steps", 0) - straight.get("skipped_steps", 0))
    if noise >= 0.2 + 2 * noise_skips * update:
        return f"two identical runs differ by {noise:.3g} of the last M steps' update: too noisy to check"
    allowed = 3 * noise + 2 * skips * update
    if off > allowed:
        return (f"resumed run off by {off:.3g} of the last M steps' update; allowed {allowed:.3g} (identical runs "
                f"differ by {noise:.3g}, {skips} skipped update(s) more or fewer than the straight run, one update "
                f"{update:.3g})")
    return None


def _check_resume(out, straight_history, resumed_history):
    """N + M straight against N then --resume M: resume_disagreement, and on a deterministic GPU the same losses."""
    from operations.checkpoint import load_checkpoint
    last = lambda name: load_checkpoint(os.path.join(out, name, "checkpoints", "last.pt"))  # noqa: E731
    straight, straight2, resumed = last("straight"), last("straight2"), last("halves")
    assert straight["step"] == resumed["step"] == N + M
    at_n = load_checkpoint(os.path.join(out, "halves", "checkpoints", f"{N:07d}.pt"))["model"]
    before_last = load_checkpoint(os.path.join(out, "straight", "checkpoints", f"{N + M - 1:07d}.pt"))["model"]
    why = resume_disagreement(straight, straight2, resumed, at_n, before_last)
    assert why is None, why
    if _bitwise_equal(straight["model"], straight2["model"]):
        logged = {r["step"]: r for r in straight_history}
        for record in resumed_history:
            for key in [k for k in record if k.endswith("loss") or k == "grad_norm"]:
                assert record[key] == logged[record["step"]][key], (record["step"], key)


def test_sample_ddp_with_sd_vae_architecture(data, runs):
    """A SiT-B/2 checkpoint from train.py sampled by sample_ddp.py (SDE, CFG interval, bf16), decoded by SD-VAE's
    architecture: the .npz the evaluator reads, arr_0 uint8 (N, 256, 256, 3), N PNGs, arr_1 labels."""
    import sample_ddp
    import train
    _train(train, _common(data, runs, "bf16", False) + _phase2(data, None) + [
        "--exp-name", "ckpt", "--max-train-steps", "2", "--log-every", "1", "--vae", SAMPLE_VAE])
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision  # --precision sets them
    num, batch, steps = SAMPLE_DDP
    try:
        npz = sample_ddp.main(["--ckpt", os.path.join(runs, "ckpt", "checkpoints", "last.pt"),
                               "--sample-dir", os.path.join(runs, "samples"), "--num-fid-samples", str(num),
                               "--per-proc-batch-size", str(batch), "--num-steps", str(steps), "--cfg-scale", "1.5",
                               "--guidance-high", "0.7", "--precision", "bf16", "--vae", SAMPLE_VAE])
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved
    with np.load(npz) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (num, RESOLUTION, RESOLUTION, 3)
    assert images.std() > 0  # decoded content, not one constant
    assert labels.shape == (num,) and 0 <= labels.min() and labels.max() < 1000
    pngs = [f for f in os.listdir(npz[: -len(".npz")]) if f.endswith(".png")]
    assert len(pngs) == num


def _synthetic_npz(path, n, seed, side):
    """Images with structure at several scales (smooth colour fields + noise), so Inception features spread."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, 8, 8, 3))
    smooth = np.kron(coarse, np.ones((1, side // 8, side // 8, 1)))
    images = np.clip(smooth + rng.normal(0, 30, (n, side, side, 3)), 0, 255).astype(np.uint8)
    np.savez(path, arr_0=images)
    return str(path)


def test_evaluator_on_gpu_matches_cpu(tmp_path):
    """The evaluator's network and the whole evaluation (random Inception weights) on the GPU against the CPU. Both
    run the network in exact float32 (TF32 off), so activations differ by summation order only: ~1e-6 of their scale,
    required <= 1e-4 (TF32 would give ~1e-3). Metrics: the CPU-measured effect of 1e-4 relative noise on the
    activations of 48 / 64 images was 3.5e-6 relative on FID; required: IS, FID and sFID within 1e-4 relative,
    precision and recall within one sample (a k-NN radius test can flip for a point on a boundary)."""
    from evaluations import evaluator
    from evaluations.inception import load_inception
    num, num_ref, side = EVALUATOR
    ref, samples = _synthetic_npz(tmp_path / "ref.npz", num_ref, 0, side), \
        _synthetic_npz(tmp_path / "samples.npz", num, 1, side)
    acts = {}
    for device in (DEVICE, "cpu"):
        acts[device] = evaluator.compute_activations(load_inception("random", device), evaluator.open_images(samples),
                                                     16, torch.device(device), with_probs=True, desc=device,
                                                     progress=False)
    for key in ("pool", "spatial", "probs"):
        scale = float(np.abs(acts["cpu"][key]).max())
        diff = float(np.abs(acts[DEVICE][key] - acts["cpu"][key]).max())
        assert diff <= 1e-4 * scale, f"{key}: GPU and CPU activations differ by {diff:.3g} (scale {scale:.3g})"
    results = {}
    for device in (DEVICE, "cpu"):
        out = tmp_path / f"{device}.json"
        evaluator.main([ref, samples, "--inception-weights", "random", "--device", device, "--no-cache",
                        "--is-split-size", str(num // 2), "--json", str(out)])
        with open(out) as f:
            results[device] = json.load(f)
    gpu, cpu = results[DEVICE], results["cpu"]
    for key in ("inception_score", "fid", "sfid"):
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-4), key
    assert abs(gpu["precision"] - cpu["precision"]) <= 1 / num + 1e-9
    assert abs(gpu["recall"] - cpu["recall"]) <= 1 / num_ref + 1e-9


def test_sampling_steps_do_not_synchronize():
    """SiT-B/2 (random weights) sampled as sample_ddp.py samples: SDE, per-sample CPU generators for the step noise,
    CFG 1.8 on t <= 0.7, bf16. After a warm-up batch, CUDA sync debug mode over a whole batch: no step may wait for
    the GPU (a host read of a device value, a copy from pageable memory)."""
    import warnings

    from tests.observers import SYNC_WARNING
    from erw.samplers import GuidedVelocity, sample_batch
    from erw.transport import get_path
    from models.sit import create_sit
    with torch.device(DEVICE):  # random init on the device: the weights do not matter here
        model = create_sit(MODEL, input_size=RESOLUTION // 8, num_classes=1000, z_dims=[]).eval()
    velocity = GuidedVelocity(model, 1.8, 0.0, 0.7, torch.bfloat16)
    n = 4 if REHEARSAL else 16

    def one_batch():
        noise = torch.randn(n, model.in_channels, RESOLUTION // 8, RESOLUTION // 8, device=DEVICE)
        labels = torch.arange(n, device=DEVICE)
        generators = [torch.Generator().manual_seed(i) for i in range(n)]
        return sample_batch("sde", velocity, noise, labels, 6, get_path("linear"), noise_source=generators)

    one_batch()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            x = one_batch()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = sorted({f"{w.filename}:{w.lineno}" for w in caught if SYNC_WARNING in str(w.message)})
    assert not syncs, f"sampling steps synchronized with the host at: {syncs}"
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("precision,compiled", CHAINS, ids=CHAIN_IDS)
def test_phase1_phase2_resume(data, runs, precision, compiled, monkeypatch):
    """Phase 1 (P1_STEPS) -> Phase 2 warm-started from its last.pt: N + M steps straight, the same again (watched for
    host syncs, see test_training_steps_do_not_synchronize), and N steps then --resume to N + M."""
    import train
    import train_warmup
    from tests.observers import ObjectiveProbe, probing
    from torch._dynamo.utils import counters
    _fail_on_recompile_limit(monkeypatch)
    graphs_before = counters["stats"]["unique_graphs"]
    common = _common(data, runs, precision, compiled)
    phase1 = _train(train_warmup, common + ["--exp-name", "p1", "--max-train-steps", str(P1_STEPS),
                                            "--log-every", str(P1_LOG)])
    if compiled:
        assert counters["stats"]["unique_graphs"] > graphs_before, "--compile compiled nothing"
    phase2 = common + _phase2(data, os.path.join(runs, "p1", "checkpoints", "last.pt"))
    # A checkpoint one update before the end measures the size of one update (checkpointing is run-control).
    straight = _train(train, phase2 + ["--exp-name", "straight", "--max-train-steps", str(N + M),
                                       "--log-every", str(P2_LOG), "--checkpointing-steps", str(N + M - 1)])
    # The second straight run measures the GPU's run-to-run noise. It logs only at its end (log_every is run-control,
    # it changes nothing that is trained), so that its steps SYNC_START..SYNC_STOP can be watched for host syncs.
    probe = ObjectiveProbe(SYNC_START, SYNC_STOP, watch_syncs=True)
    with probing(train, probe):
        _train(train, phase2 + ["--exp-name", "straight2", "--max-train-steps", str(N + M), "--log-every", str(BIG)])
    SYNC_PROBES[(precision, compiled)] = probe
    _train(train, phase2 + ["--exp-name", "halves", "--max-train-steps", str(N), "--log-every", str(P2_LOG)])
    resumed = _train(train, phase2 + ["--exp-name", "halves", "--max-train-steps", str(N + M), "--resume",
                                      "--log-every", str(P2_LOG)])
    if not REHEARSAL:  # a few toy steps have no loss to fall
        _check_learns(phase1, "loss", FALL, f"Phase 1 {precision}")
        _check_learns(straight, "velocity_loss", FALL, f"Phase 2 {precision}")
    _check_resume(runs, straight, resumed)


@pytest.mark.parametrize("precision,compiled", CHAINS, ids=CHAIN_IDS)
def test_training_steps_do_not_synchronize(precision, compiled):
    """CUDA sync debug mode over micro-batches SYNC_START..SYNC_STOP of a Phase-2 run (teacher, NT-Xent, EMA,
    clipping, fp16 loss scaling; run by test_phase1_phase2_resume) that logs and checkpoints only at its end: no
    operation in that window may wait for the GPU (.item(), a blocking device-to-host or pageable host-to-device
    copy, nonzero, synchronize)."""
    probe = SYNC_PROBES.get((precision, compiled))
    if probe is None:
        pytest.skip("test_phase1_phase2_resume did not get as far as the watched run")
    assert probe.seconds is not None, "the watched window was never reached"
    assert not probe.sync_warnings, (f"{len(probe.sync_warnings)} host synchronization(s) in {probe.steps} training "
                                     f"steps without logging or checkpointing, at: " + "; ".join(probe.sync_sites()))
