"""The training loop's arithmetic against closed forms and properties: EMA, the data order over epochs and resume
points, gradient accumulation, gradient clipping (fp16 included), and a step that never reads a device value."""
import os
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

import train
import train_warmup
from operations.checkpoint import load_checkpoint
from erw.data import ResumableShardSampler
from erw import loop
from erw.step import MixedPrecision, update_ema
from tests.conftest import tiny_args
from tests.observers import StepHook, observe_fit, record_optimizer_steps

EPS32 = torch.finfo(torch.float32).eps


def phase2_args(demo_data, out, *extra):
    """Phase 2 without warm start and without sample grids in between (they cost time and are tested elsewhere)."""
    return tiny_args(demo_data, out, "--warmup-ckpt", "none", "--vae", os.path.join(str(demo_data), "vae"),
                     "--sample-grid-every", "1000", "--sample-num-steps", "2", *extra)


def float64_state(module):
    return {name: p.detach().double().clone() for name, p in module.named_parameters()}


# ------------------------------------------------------------------ EMA

@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
def test_ema_after_n_updates_is_its_closed_form(decay):
    """ema_n = d^n ema_0 + (1 - d) sum_k d^(n-k) m_k, for model weights m_1..m_n set by the test."""
    torch.manual_seed(0)
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    start = float64_state(ema)
    seen = []
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        seen.append(float64_state(model))
        update_ema(ema, model, decay)
    n = len(seen)
    for name, value in ema.named_parameters():
        expected = decay ** n * start[name] + (1 - decay) * sum(decay ** (n - k) * m[name]
                                                                for k, m in enumerate(seen, start=1))
        # Each float32 update (a lerp of O(1) values) rounds to within ~2 eps; earlier roundings decay with d: 6
        # updates leave < 12 eps = 1.4e-6. Swapping d and 1 - d moves the result by O(1).
        torch.testing.assert_close(value.detach().double(), expected, rtol=0, atol=16 * EPS32)


def test_the_loops_ema_follows_the_weights_it_trained(demo_data, tmp_path, monkeypatch):
    """After every optimizer step s: ema_s = d ema_(s-1) + (1 - d) model_s, with ema_0 = the initial model, the
    decay the flag gives and the weights after (not before) update s."""
    after_step = []

    def watch(call):
        model = call.model
        call.hooks.append(StepHook(lambda run, step, ema: after_step.append((step, float64_state(model),
                                                                             float64_state(ema)))))

    observe_fit(monkeypatch, before=watch)
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "4", "--ema-decay", "0.8"))
    assert [s for s, _, _ in after_step] == [0, 1, 2, 3, 4]
    (_, model0, ema0), *rest = after_step
    for name in model0:
        assert torch.equal(model0[name], ema0[name])
    previous = ema0
    for step, model, ema in rest:
        assert any(not torch.equal(model[n], model0[n]) for n in model)  # the model does train
        for name in ema:
            expected = 0.8 * previous[name] + 0.2 * model[name]
            # One float32 lerp per step: within ~2 eps of O(1) values; 8 eps leaves room, a wrong decay or the
            # weights before the update would be off by ~lr = 1e-3.
            torch.testing.assert_close(ema[name], expected, rtol=0, atol=8 * EPS32, msg=f"step {step} {name}")
        previous = ema
    # The checkpoint holds these: the EMA as its EMA, the weights as its model.
    ckpt = load_checkpoint(os.path.join(tmp_path, "tiny-warmup", "checkpoints", "last.pt"))
    _, model, ema = after_step[-1]
    for name in ema:
        assert torch.equal(ckpt["ema"][name].double(), ema[name]) and torch.equal(ckpt["model"][name].double(),
                                                                                  model[name]), name


# ------------------------------------------------------------------ data order

def global_stream(dataset_len, batch, world, seed, start=0, micro_batches=20):
    """The items of `micro_batches` global micro-batches from micro-batch `start`, in global row order (rank r's
    local row i is global row i * world + r), from `world` samplers of `batch` rows each."""
    streams = [iter(ResumableShardSampler(dataset_len, batch, r, world, seed, start_micro_batch=start))
               for r in range(world)]
    out = []
    for _ in range(micro_batches):
        local = [[next(s) for _ in range(batch)] for s in streams]
        out += [local[r][i] for i in range(batch) for r in range(world)]
    return out


@pytest.mark.parametrize("dataset_len,batch,world", [(24, 4, 1), (24, 2, 3), (26, 3, 2)])
def test_each_epoch_is_a_new_permutation_and_a_resume_point_continues_the_stream(dataset_len, batch, world):
    per_epoch = (dataset_len // (batch * world)) * batch * world  # whole global micro-batches only
    epochs = 4
    stream = global_stream(dataset_len, batch, world, seed=3, micro_batches=epochs * per_epoch // (batch * world))
    chunks = [stream[e * per_epoch:(e + 1) * per_epoch] for e in range(epochs)]
    for chunk in chunks:
        assert len(set(chunk)) == per_epoch and set(chunk) <= set(range(dataset_len))  # each item at most once
        if per_epoch == dataset_len:
            assert sorted(chunk) == list(range(dataset_len))  # and every item once
    assert len({tuple(c) for c in chunks}) == epochs  # a new order every epoch
    # A resume at micro-batch m (mid-epoch or on an epoch boundary) continues the same stream.
    micro = batch * world
    for m in (1, per_epoch // micro, per_epoch // micro + 1, 3 * per_epoch // micro - 1):
        resumed = global_stream(dataset_len, batch, world, seed=3, start=m, micro_batches=5)
        assert resumed == stream[m * micro:(m + 5) * micro], m
    # Another seed, another order; the same seed and one process with the whole micro-batch, the same order.
    assert global_stream(dataset_len, batch, world, seed=4, micro_batches=3) != stream[:3 * micro]
    assert global_stream(dataset_len, batch * world, 1, seed=3, micro_batches=3) == stream[:3 * micro]


# ------------------------------------------------------------------ gradient accumulation

def test_accumulating_two_micro_batches_gives_the_update_of_the_whole_batch(demo_data, tmp_path, monkeypatch):
    """REPA's loss (velocity + cosine alignment, both means over images) at global batch 16: one micro-batch of 16
    and two of 8 see the same images with the same noise, times and label drops (erw/batch_random.py), so the
    gradient each optimizer step applies is the same up to float32 summation order."""
    steps = record_optimizer_steps(monkeypatch)
    # No clipping: it would scale a gradient that is wrong by a constant factor back to the same norm.
    common = ["--batch-size", "16", "--max-train-steps", "2", "--log-every", "1", "--align-loss", "cosine",
              "--proj-decay", "none", "--max-grad-norm", "1e6"]
    whole = train.main(phase2_args(demo_data, tmp_path, "--exp-name", "whole", *common))
    whole_steps, steps[:] = list(steps), []
    split = train.main(phase2_args(demo_data, tmp_path, "--exp-name", "split", *common,
                                   "--gradient-accumulation-steps", "2"))
    assert len(whole_steps) == len(steps) == 2  # one optimizer step per two micro-batches
    for name in ("whole", "split"):
        position = load_checkpoint(os.path.join(tmp_path, name, "checkpoints", "last.pt"))["data_position"]
        assert position["micro_batch"] * position["local_batch_size"] == 32, name  # the same 32 items
    # Gradients of the first step (same weights on both sides). Each entry is a sum over 16 images of products
    # through a 4-block network; the two sides group that sum differently (16 vs 8 + 8, the halves scaled by
    # 1/2 exactly) and batched kernels may round activations differently: within ~(depth x ops) eps ~ 100 eps of
    # each other, norm-wise. Bound 1e-4 (~800 eps); a missing 1/2 or a lost micro-batch is off by ~50%.
    a, b = (torch.cat([g.flatten() for g in s[0]["grads"].values()]) for s in (whole_steps, steps))
    assert (a - b).norm() <= 1e-4 * a.norm()
    # The logged values are the step's means over its micro-batches, as the loss is (the gradient norm is the whole
    # step's); after one update (weights that differ at rounding level, AdamW's first update being ~lr x sign(g))
    # they agree to 1e-4.
    for key in ("loss", "velocity_loss", "align_loss", "grad_norm"):
        assert split["history"][0][key] == pytest.approx(whole["history"][0][key], rel=1e-5), key
        assert split["history"][1][key] == pytest.approx(whole["history"][1][key], rel=1e-4), key


def test_accumulation_with_ntxent_says_its_negatives_are_one_micro_batch(demo_data, tmp_path):
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "1", "--batch-size", "16",
                                "--gradient-accumulation-steps", "2"))
    with open(os.path.join(tmp_path, "tiny-warmup", "log.txt")) as f:
        assert "NT-Xent's negatives are the 8 images of one micro-batch, not the 16 of the optimizer step" in f.read()


# ------------------------------------------------------------------ clipping

def record_raw_gradients(monkeypatch, calls, raw):
    """A `before` for observe_fit: each parameter's gradient as backward leaves it (loss-scaled, float64), divided by
    the GradScaler's scale of that moment: the unclipped gradient in the units of the loss."""
    precisions = []

    class Recorded(MixedPrecision):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            precisions.append(self)

    monkeypatch.setattr(loop, "MixedPrecision", Recorded)

    def before(call):
        def hook(p):
            scaler = precisions[-1].scaler
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            raw.setdefault(len(calls), {})[id(p)] = p.grad.detach().double() / scale
        calls.append(call)
        for p in call.model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(hook)
    return before


@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e6])
@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_the_applied_gradient_is_the_raw_one_clipped_to_max_grad_norm(demo_data, tmp_path, monkeypatch, precision,
                                                                     max_grad_norm):
    """What AdamW receives, in the loss's units: g * min(1, max_grad_norm / |g|), g the unscaled raw gradient; with
    fp16 the GradScaler's factor must be removed before the norm is taken."""
    calls, raw = [], {}
    observe_fit(monkeypatch, before=record_raw_gradients(monkeypatch, calls, raw))
    steps = record_optimizer_steps(monkeypatch)
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "1", "--mixed-precision", precision,
                                "--max-grad-norm", str(max_grad_norm)))
    (applied,) = [s["grads"] for s in steps]
    g = raw[1]
    assert applied.keys() == g.keys()
    norm = torch.cat([v.flatten() for v in g.values()]).norm()
    assert torch.isfinite(norm) and (norm > 10 * max_grad_norm if max_grad_norm < 1 else norm < max_grad_norm)
    coef = min(1.0, max_grad_norm / norm.item())
    # The clip factor is computed in float32 from a float32 norm of ~10^5 entries (relative error ~ log2(n) eps),
    # applied with one more rounding: 1e-5 relative covers both, and the factor's 1e-6 guard, with room; the
    # scaled-units bug is off by the loss scale, 2^16.
    for key, value in applied.items():
        torch.testing.assert_close(value, g[key] * coef, rtol=1e-5, atol=1e-5 * coef * norm.item() / 100)


def test_max_grad_norm_0_means_no_clipping(demo_data, tmp_path, monkeypatch):
    """0 turns clipping off, as most codebases read it (clip_grad_norm_ with 0 would zero every gradient): AdamW gets
    the raw gradient, and the log holds its norm."""
    calls, raw = [], {}
    observe_fit(monkeypatch, before=record_raw_gradients(monkeypatch, calls, raw))
    steps = record_optimizer_steps(monkeypatch)
    result = train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "1", "--log-every", "1",
                                         "--max-grad-norm", "0"))
    (applied,) = [s["grads"] for s in steps]
    g = raw[1]
    norm = torch.cat([v.flatten() for v in g.values()]).norm()
    assert norm > 0
    for key, value in applied.items():
        assert torch.equal(value, g[key])  # multiplied by exactly 1
    # float32 norm of ~10^5 entries against the float64 one: 1e-5 relative
    assert result["history"][-1]["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)


# ------------------------------------------------------------------ no host sync between log steps

# Tensor methods that copy a value to the host: on CUDA each waits for every queued kernel.
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "__format__", "cpu",
              "numpy", "nonzero", "masked_select", "unique", "unique_consecutive"}


class HostReadWatch(TorchFunctionMode):
    """Records every host read of a tensor, with the optimizer step it happens in (`step` is set by a hook after
    each step; None before the loop starts). The data loader's own work (the sampler's index list, collation) runs
    before anything reaches the device, on the host, and is left out."""

    def __init__(self):
        super().__init__()
        self.step, self.reads = None, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        mask_index = name in ("__getitem__", "__setitem__") and len(args) > 1 and isinstance(args[1], torch.Tensor) \
            and args[1].dtype == torch.bool
        if (name in HOST_READS or mask_index) and self.step is not None:
            stack = traceback.extract_stack()[:-1]
            if not any(os.sep + os.path.join("torch", "utils", "data") + os.sep in f.filename for f in stack):
                where = next((f"{os.path.basename(f.filename)}:{f.lineno} {f.line}" for f in reversed(stack)
                              if "site-packages" not in f.filename and "observers" not in f.filename), "?")
                self.reads.append((self.step + 1, name, where))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("precision,accumulation", [("no", "1"), ("fp16", "2")])
def test_a_step_that_neither_logs_nor_saves_never_reads_a_device_value(demo_data, tmp_path, monkeypatch, precision,
                                                                       accumulation):
    watch = HostReadWatch()

    def before(call):
        def mark(run, step, ema):
            watch.step = step
        call.hooks.append(StepHook(mark))

    observe_fit(monkeypatch, before=before)
    with watch:
        train.main(phase2_args(demo_data, tmp_path, "--max-train-steps", "8", "--log-every", "4",
                               "--checkpointing-steps", "4", "--mixed-precision", precision,
                               "--gradient-accumulation-steps", accumulation, "--batch-size", "16"))
    assert {step for step, _, _ in watch.reads} <= {4, 8}, [r for r in watch.reads if r[0] not in (4, 8)]
    assert any(step == 4 for step, _, _ in watch.reads)  # the watch sees the log step's reads


def test_every_step_draws_new_times_and_noise_for_every_image(demo_data, tmp_path, monkeypatch):
    """The loop reseeds per step; the draws must still differ between steps and between the images of a batch."""
    inputs = []

    def watch(call):
        def record(module, args):
            if module.training:  # not the EMA copy (it inherits the hook) sampling the grids
                inputs.append((args[0].clone(), args[1].clone()))
        call.model.register_forward_pre_hook(record)

    observe_fit(monkeypatch, before=watch)
    train.main(phase2_args(demo_data, tmp_path, "--max-train-steps", "3", "--batch-size", "8"))
    assert len(inputs) == 3
    times = [t for _, t in inputs]
    assert all(len(set(t.tolist())) == 8 for t in times)
    assert not any(torch.equal(a, b) for i, a in enumerate(times) for b in times[i + 1:])
    noisy = [x for x, _ in inputs]
    assert not any(torch.equal(a, b) for i, a in enumerate(noisy) for b in noisy[i + 1:])
