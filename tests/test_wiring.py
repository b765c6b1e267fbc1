"""What the entry points hand the training loop, observed at erw.loop.fit for every flag of README's "Flags
researchers ablate" table, and what a --resume may change: every training key of the OPTIONS table is refused, every
run-control key accepted."""
import math
import os
import re

import pytest
import torch
import yaml

import train
import train_warmup
from operations.checkpoint import load_checkpoint, save_checkpoint
from operations.config import INVOCATION_KEYS, OPTIONS, OPTIONS_BY_NAME, TRAIN, WARMUP, resolve_config
from erw.loop import SampleGrids
from operations.run import CONFIG_HISTORY_FILE, open_run
from tests.conftest import ROOT, tiny_args
from tests.observers import observe_fit

TEACHER = "random-vit-tiny"


@pytest.fixture(scope="module")
def phase1(demo_data, tmp_path_factory):
    """A 2-block Phase-1 checkpoint whose EMA differs from its weights (decay 0.5, 3 steps)."""
    out = tmp_path_factory.mktemp("phase1")
    train_warmup.main(tiny_args(demo_data, out, "--max-train-steps", "3", "--ema-decay", "0.5"))
    return os.path.join(out, "tiny-warmup", "checkpoints", "last.pt")


def built(monkeypatch, entry, demo_data, out, *flags):
    """Run an entry point up to the loop (nothing trains): what it handed erw.loop.fit. Phase 2 starts without warm
    start unless the flags give --warmup-ckpt (the last of a repeated flag wins)."""
    calls = observe_fit(monkeypatch, train_it=False)
    extra = ["--vae", os.path.join(str(demo_data), "vae"), "--warmup-ckpt", "none"] if entry is train else []
    entry.main(tiny_args(demo_data, out, *extra, *flags))
    (call,) = calls
    return call


def phase2(monkeypatch, demo_data, out, *flags):
    return built(monkeypatch, train, demo_data, out, *flags)


def phase1_call(monkeypatch, demo_data, out, *flags):
    return built(monkeypatch, train_warmup, demo_data, out, *flags)


def blocks_of(state, index):
    return {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"blocks.{index}.")}


def assert_blocks_equal(model, source, placed_at):
    """Blocks placed_at + i of `model` hold blocks i of `source` (a state dict), exactly."""
    state = model.state_dict()
    for i in range(len({k.split(".")[1] for k in source if k.startswith("blocks.")})):
        ckpt_block, model_block = blocks_of(source, i), blocks_of(state, placed_at + i)
        assert ckpt_block.keys() == model_block.keys()
        for key in ckpt_block:
            assert torch.equal(model_block[key], ckpt_block[key]), f"blocks.{placed_at + i}.{key}"


# ------------------------------------------------------------------ each flag of README's table, observed

def check_warmup_depth(monkeypatch, demo_data, tmp_path, phase1):
    call = phase1_call(monkeypatch, demo_data, tmp_path / "p1", "--warmup-depth", "3")
    assert len(call.model.blocks) == 3 and call.model.final_layer is None and call.model.encoder_depth == 3
    assert call.model_args["encoder_depth"] == 3 and call.model_args["built_depth"] == 3
    with pytest.raises(ValueError, match="warmed up 2 blocks but --warmup-depth is 3"):
        phase2(monkeypatch, demo_data, tmp_path / "p2", "--warmup-ckpt", phase1, "--warmup-depth", "3")


def check_encoder_depth(monkeypatch, demo_data, tmp_path, phase1):
    call = phase2(monkeypatch, demo_data, tmp_path / "d", "--encoder-depth", "2")
    assert call.model.encoder_depth == 2 and len(call.model.blocks) == 4
    call = phase2(monkeypatch, demo_data, tmp_path / "auto", "--warmup-ckpt", phase1, "--warmup-layers", "1",
                  "--encoder-depth", "auto")
    assert call.model.encoder_depth == 3  # after the last warmed block, 1..2 (0-based)


def check_lambda(monkeypatch, demo_data, tmp_path, phase1):
    call = phase2(monkeypatch, demo_data, tmp_path / "exp", "--proj-coeff", "0.3", "--proj-half-life", "40",
                  "--proj-decay", "exp")
    for s in (0, 40, 100):  # lambda(s) = l0 * 2^(-s / H), paper eq. 14
        assert call.objective.proj_coeff_at(s) == pytest.approx(0.3 * 2 ** (-s / 40), rel=1e-12)
    call = phase2(monkeypatch, demo_data, tmp_path / "none", "--proj-coeff", "0.3", "--proj-decay", "none")
    assert [call.objective.proj_coeff_at(s) for s in (0, 10 ** 6)] == [0.3, 0.3]
    call = phase2(monkeypatch, demo_data, tmp_path / "zero", "--proj-coeff", "0")
    assert call.teachers == [] and call.objective.align is None  # plain SiT: no teacher is even loaded


def check_warmup_layers(monkeypatch, demo_data, tmp_path, phase1):
    call = phase2(monkeypatch, demo_data, tmp_path, "--warmup-ckpt", phase1, "--warmup-layers", "2")
    source = load_checkpoint(phase1)["model"]
    assert_blocks_equal(call.model, source, placed_at=2)
    for key in ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "projectors.0.0.weight"):
        assert torch.equal(call.model.state_dict()[key], source[key]), key
    fresh = blocks_of(call.model.state_dict(), 0)
    assert not torch.equal(fresh["attn.qkv.weight"], blocks_of(source, 0)["attn.qkv.weight"])


def check_warmup_weights(monkeypatch, demo_data, tmp_path, phase1):
    ckpt = load_checkpoint(phase1)
    for weights in ("ema", "model"):
        call = phase2(monkeypatch, demo_data, tmp_path / weights, "--warmup-ckpt", phase1, "--warmup-weights",
                      weights)
        assert_blocks_equal(call.model, ckpt[weights], placed_at=0)


def check_enc_type(monkeypatch, demo_data, tmp_path, phase1):
    for entry in (train, train_warmup):
        call = built(monkeypatch, entry, demo_data, tmp_path / entry.__name__, "--enc-type", f"{TEACHER},{TEACHER}")
        assert [t.name for t in call.teachers] == [TEACHER, TEACHER] and len(call.model.projectors) == 2
    call = phase2(monkeypatch, demo_data, tmp_path / "none", "--enc-type", "none")
    assert call.teachers == [] and call.objective.align is None and len(call.model.projectors) == 0


def check_align_loss(monkeypatch, demo_data, tmp_path, phase1):
    for entry in (train, train_warmup):
        call = built(monkeypatch, entry, demo_data, tmp_path / entry.__name__, "--align-loss", "cosine",
                     "--ntxent-temp", "0.37")
        assert call.objective.align == "cosine" and call.objective.ntxent_temp == 0.37, entry.__name__
        assert call.objective.velocity is (entry is train)


def check_path_and_weighting(monkeypatch, demo_data, tmp_path, phase1):
    call = phase2(monkeypatch, demo_data, tmp_path, "--path-type", "cosine", "--weighting", "lognormal")
    t = torch.tensor([0.3], dtype=torch.float64)
    alpha, sigma = call.objective.path.alpha_sigma(t)
    assert (alpha.item(), sigma.item()) == pytest.approx((math.cos(0.15 * math.pi), math.sin(0.15 * math.pi)))
    assert call.objective.weighting == "lognormal"


def check_attention_options(monkeypatch, demo_data, tmp_path, phase1):
    for entry in (train, train_warmup):
        call = built(monkeypatch, entry, demo_data, tmp_path / entry.__name__, "--qk-norm", "--use-rope")
        assert isinstance(call.model.blocks[0].attn.q_norm, torch.nn.LayerNorm) and call.model.feat_rope is not None
        assert call.model_args["qk_norm"] is True and call.model_args["use_rope"] is True


# README flag -> the check that observes it.
WIRING = {
    "--warmup-depth": check_warmup_depth, "--encoder-depth": check_encoder_depth, "--proj-coeff": check_lambda,
    "--proj-decay": check_lambda, "--proj-half-life": check_lambda, "--warmup-layers": check_warmup_layers,
    "--warmup-weights": check_warmup_weights, "--enc-type": check_enc_type, "--align-loss": check_align_loss,
    "--ntxent-temp": check_align_loss, "--path-type": check_path_and_weighting,
    "--weighting": check_path_and_weighting, "--qk-norm": check_attention_options,
    "--use-rope": check_attention_options,
}


def readme_ablation_flags():
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("## Flags researchers ablate", 1)[1].split("\n## ", 1)[0]
    rows = [re.split(r"(?<!\\)\|", line)[1] for line in section.splitlines() if line.startswith("| `--")]
    return sorted({flag for row in rows for flag in re.findall(r"--[a-z0-9-]+", row)})


def test_every_flag_readme_lists_has_a_wiring_check():
    flags = readme_ablation_flags()
    assert len(flags) >= 10 and set(flags) == set(WIRING), sorted(set(flags) ^ set(WIRING))


@pytest.mark.parametrize("check", sorted(set(WIRING.values()), key=lambda f: f.__name__), ids=lambda f: f.__name__)
def test_the_entry_points_hand_the_loop_what_the_flags_say(check, monkeypatch, demo_data, tmp_path, phase1):
    check(monkeypatch, demo_data, tmp_path, phase1)


def test_label_dropout_and_hooks_reach_the_loop(monkeypatch, demo_data, tmp_path):
    """--cfg-prob trains the null class in both phases (CFG needs it); Phase 2's sample grids follow their flags."""
    for entry in (train, train_warmup):
        call = built(monkeypatch, entry, demo_data, tmp_path / entry.__name__, "--cfg-prob", "0.25")
        assert call.objective.cfg_prob == 0.25, entry.__name__
    call = phase2(monkeypatch, demo_data, tmp_path / "grids", "--sample-grid-every", "7", "--sample-grid-size", "5",
                  "--sample-num-steps", "3", "--max-train-steps", "20")
    (grids,) = [h for h in call.hooks if isinstance(h, SampleGrids)]
    assert (grids.every, grids.num_steps, len(grids.noise), grids.last_step) == (7, 3, 5, 20)
    assert call.run.local_batch_size == 32


# ------------------------------------------------------------------ what a resume may change

# The run-control keys, written out: a key added later is a training key (refused on resume) unless it is added here
# on purpose; flipping a training key to run-control in operations/config.py fails here.
RUN_CONTROL = {"exp_name", "output_dir", "resume", "resume_override", "report_to", "log_every", "num_workers", "vae",
               "sample_grid_every", "sample_grid_size", "sample_num_steps", "fid_every", "fid_num_samples",
               "fid_num_steps", "fid_mode", "fid_precision", "fid_ref", "inception_weights", "cfg_scale",
               "guidance_low", "guidance_high", "max_train_steps", "checkpointing_steps", "compile", "fd_dinov2",
               "fid_bitwise"}
LOCATION = {"exp_name", "output_dir"}  # where the run lives: another value is another run, not a change


def test_the_run_control_keys_are_exactly_these():
    assert {o.name for o in OPTIONS if o.run_control} == RUN_CONTROL


def changed(name, value):
    """Another valid-looking value of the option."""
    option = OPTIONS_BY_NAME[name]
    if isinstance(value, bool):
        return not value
    if option.choices:
        return next(c for c in option.choices if c != value)
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.5
    return (value or "x") + "-changed"


def keys(phase, run_control):
    return [o.name for o in OPTIONS if phase in o.phases and o.run_control == run_control
            and o.name not in INVOCATION_KEYS and o.name not in LOCATION]


@pytest.fixture
def stored_run(demo_data, tmp_path, request, monkeypatch):
    """(config, exp dir) of a run whose checkpoint records `config`: what _check_resume compares against."""
    # --allow-tf32 sets torch's global matmul precision; keep it from leaking into later tests.
    for backend in (torch.backends.cuda.matmul, torch.backends.cudnn.conv):
        monkeypatch.setattr(backend, "fp32_precision", backend.fp32_precision)
    phase = request.param
    config = resolve_config(phase, tiny_args(demo_data, tmp_path))
    exp_dir = os.path.join(config["output_dir"], config["exp_name"])
    save_checkpoint({"config": config, "step": 3, "model_args": {}}, os.path.join(exp_dir, "checkpoints",
                                                                                 "0000003.pt"))
    return config, exp_dir


def resumed(config, key):
    new = {**config, "resume": True}
    new[key] = changed(key, config[key])
    return new


@pytest.mark.parametrize("stored_run,key", [(p, k) for p in (WARMUP, TRAIN) for k in keys(p, False)],
                         indirect=["stored_run"])
def test_resume_refuses_every_training_key(stored_run, key):
    config, exp_dir = stored_run
    new = resumed(config, key)
    with pytest.raises(ValueError, match=re.escape(f"{key}: {config[key]!r} in the checkpoint, {new[key]!r} now")):
        open_run(new)
    assert not os.path.exists(os.path.join(exp_dir, "config.yaml"))  # refused before anything is written
    open_run({**new, "resume_override": [key]}).close()  # unless named in --resume-override
    with open(os.path.join(exp_dir, CONFIG_HISTORY_FILE)) as f:
        assert yaml.safe_load(f)[-1]["overridden"] == [key]


@pytest.mark.parametrize("stored_run,key", [(p, k) for p in (WARMUP, TRAIN) for k in keys(p, True)],
                         indirect=["stored_run"])
def test_resume_accepts_every_run_control_key(stored_run, key):
    config, exp_dir = stored_run
    new = resumed(config, key)
    open_run(new).close()
    with open(os.path.join(exp_dir, "config.yaml")) as f:
        assert yaml.safe_load(f)[key] == new[key]  # config.yaml states what the run uses
    with open(os.path.join(exp_dir, CONFIG_HISTORY_FILE)) as f:
        record = yaml.safe_load(f)[-1]
    assert record["changed"] == {key: [config[key], new[key]]} and record["overridden"] == []
