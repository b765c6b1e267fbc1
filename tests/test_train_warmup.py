"""Phase 1 (train_warmup.py) and the shared loop on the tiny config: learning, truncation, resume, errors."""
import os

import pytest
import torch

import train_warmup
from operations.checkpoint import load_checkpoint
from operations.config import OPTIONS, ConfigError, resolve_config
from erw.losses import Objective
from models.encoders import load_teachers
from models.sit import create_sit
from tests.conftest import TINY_CONFIG, tiny_args


def test_warmup_loss_falls(demo_data, tmp_path):
    result = train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "60", "--log-every", "5"))
    losses = [r["align_loss"] for r in result["history"]]
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    # NT-Xent over a batch of 32 starts near log(32) = 3.47. The random teacher's tokens of different images
    # are close (mean cosine 0.6 at a position), so the floor is high: 60 steps took 3.41 -> 2.79 (-18%) here.
    assert first > 3.0
    assert last < 0.9 * first, losses
    ckpt = load_checkpoint(os.path.join(tmp_path, "tiny-warmup", "checkpoints", "last.pt"))
    assert ckpt["step"] == 60 and ckpt["model_args"]["built_depth"] == ckpt["model_args"]["encoder_depth"] == 2
    assert os.path.isfile(os.path.join(tmp_path, "tiny-warmup", "config.yaml"))
    assert os.path.isfile(os.path.join(tmp_path, "tiny-warmup", "log.txt"))


def test_only_the_first_k_blocks_exist_and_all_of_them_learn():
    k = 2
    model = create_sit("SiT-Tiny/2", input_size=8, num_classes=10, encoder_depth=k, z_dims=[64], built_depth=k)
    assert len(model.blocks) == k and model.final_layer is None
    assert not any(name.startswith(f"blocks.{k}.") or name.startswith("final_layer") for name in model.state_dict())
    teacher = load_teachers("random-vit-tiny", 64)[0]
    objective = Objective(velocity=False, align="ntxent")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 64, 64), generator=g, dtype=torch.uint8)
    latents, labels = torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    for _ in range(3):  # adaLN-Zero gates start at 0: the attention/MLP weights get gradients from step 2 on
        loss, _ = objective(model, latents, labels, [teacher(images)], 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert no_grad == []


def _state_equal(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs"
        elif isinstance(a[k], dict):
            _state_equal(a[k], b[k], f"{what}.{k}")
        elif isinstance(a[k], list):
            assert len(a[k]) == len(b[k])
            for i, (x, y) in enumerate(zip(a[k], b[k])):
                _state_equal({"v": x}, {"v": y}, f"{what}.{k}[{i}]") if isinstance(x, (torch.Tensor, dict)) \
                    else None
        else:
            assert a[k] == b[k], f"{what}: {k} differs"


def test_resume_continues_exactly(demo_data, tmp_path):
    # 160 items / batch 32 = 5 micro-batches per epoch: the resumed half starts mid-epoch and crosses an epoch.
    common = ["--log-every", "1", "--checkpointing-steps", "4"]
    train_warmup.main(tiny_args(demo_data, tmp_path, "--exp-name", "straight", "--max-train-steps", "8", *common))
    train_warmup.main(tiny_args(demo_data, tmp_path, "--exp-name", "halves", "--max-train-steps", "4", *common))
    train_warmup.main(tiny_args(demo_data, tmp_path, "--exp-name", "halves", "--max-train-steps", "8", "--resume",
                                *common))
    straight = load_checkpoint(os.path.join(tmp_path, "straight", "checkpoints", "last.pt"))
    resumed = load_checkpoint(os.path.join(tmp_path, "halves", "checkpoints", "last.pt"))
    assert straight["step"] == resumed["step"] == 8
    for key in ("model", "ema", "opt", "data_position"):
        _state_equal(straight[key], resumed[key], key)


def test_rerunning_a_finished_experiment_without_resume_is_refused(demo_data, tmp_path):
    args = tiny_args(demo_data, tmp_path, "--max-train-steps", "1")
    train_warmup.main(args)
    with pytest.raises(FileExistsError, match="--resume"):
        train_warmup.main(args)


def test_bad_config_value_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("exp_name: x\nbatch_size: lots\n")
    with pytest.raises(ConfigError, match="batch_size"):
        resolve_config("warmup", ["--config", str(bad)])
    bad.write_text("exp_name: x\nbatchsize: 8\n")
    with pytest.raises(ConfigError, match="unknown config key 'batchsize'"):
        resolve_config("warmup", ["--config", str(bad)])
    with pytest.raises(ConfigError, match="align_loss"):
        resolve_config("warmup", ["--config", TINY_CONFIG, "--align-loss", "l2"])
    with pytest.raises(ConfigError, match="warmup_ckpt"):
        bad.write_text("exp_name: x\nwarmup:\n  warmup_ckpt: a.pt\n")
        resolve_config("warmup", ["--config", str(bad)])
    # The section of the other phase is checked too: Phase 1 refuses a typo that only Phase 2 would read.
    bad.write_text("exp_name: x\ntrain:\n  encoder_dpeth: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml \[train\]: unknown config key 'encoder_dpeth'"):
        resolve_config("warmup", ["--config", str(bad)])
    bad.write_text("exp_name: x\ntrain:\n  sampling_steps: 500\n")  # an older config: the key's new name
    with pytest.raises(ConfigError, match=r"unknown config key 'sampling_steps' \(now 'sample_grid_every'\)"):
        resolve_config("train", ["--config", str(bad)])
    bad.write_text("exp_name: x\ntrain:\n  proj_coeff: -1\n")
    with pytest.raises(ConfigError, match=r"\[train\]: 'proj_coeff' must be in \[0, inf\)"):
        resolve_config("warmup", ["--config", str(bad)])


# What each number means bounds it (written here from the meaning, not read from the OPTIONS table): probabilities and
# the guidance interval in [0, 1], decays and Adam's betas in [0, 1), a learning rate, temperature, half-life and
# epsilon strictly positive, counts and intervals from their least meaningful value.
INF = float("inf")
RANGES = {
    "cfg_prob": "[0, 1]", "guidance_low": "[0, 1]", "guidance_high": "[0, 1]",
    "ema_decay": "[0, 1)", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)",
    "learning_rate": "(0, inf)", "ntxent_temp": "(0, inf)", "proj_half_life": "(0, inf)", "adam_epsilon": "(0, inf)",
    "proj_coeff": "[0, inf)", "adam_weight_decay": "[0, inf)", "max_grad_norm": "[0, inf)", "cfg_scale": "[1, inf)",
    "seed": "[0, inf)", "num_workers": "[0, inf)", "warmup_layers": "[0, inf)", "fid_every": "[0, inf)",
    "max_train_steps": "[0, inf)", "log_every": "[1, inf)", "num_classes": "[1, inf)", "warmup_depth": "[1, inf)",
    "sample_grid_every": "[1, inf)", "sample_grid_size": "[1, inf)", "sample_num_steps": "[1, inf)",
    "fid_num_steps": "[1, inf)", "batch_size": "[1, inf)", "gradient_accumulation_steps": "[1, inf)",
    "checkpointing_steps": "[1, inf)", "fid_num_samples": "[2, inf)", "resolution": "[8, inf)",
}
NUMERIC = [o for o in OPTIONS if o.type.__name__ in ("integer", "number")]


def test_every_numeric_setting_has_its_true_range():
    assert {o.name: o.bounds for o in NUMERIC} == RANGES


def _outside(option):
    """Values just outside the option's range (RANGES), and the non-finite ones."""
    low, high = (float(x) for x in RANGES[option.name][1:-1].split(","))
    step = 1 if option.type.__name__ == "integer" else 1e-9
    values = [low - step if RANGES[option.name][0] == "[" else low]
    if high != INF:
        values.append(high + step if RANGES[option.name][-1] == "]" else high)
    if option.type.__name__ == "number":
        values += [float("nan"), INF]
    return values


@pytest.mark.parametrize("option", NUMERIC, ids=[o.name for o in NUMERIC])
def test_a_value_outside_its_range_is_refused_naming_the_flag(option, tmp_path):
    phase = option.phases[0]
    base = ["--exp-name", "x"] + (["--warmup-ckpt", "none"] if phase == "train" else [])
    for value in _outside(option):
        text = str(int(value)) if option.type.__name__ == "integer" else repr(value)
        with pytest.raises(ConfigError, match=f"flag {option.flag}: "):
            resolve_config(phase, base + [f"{option.flag}={text}"])  # = : argparse reads "-1" as a flag
    config = tmp_path / "c.yaml"
    config.write_text(f"exp_name: x\n{option.name}: {_outside(option)[0]!r}\n")
    with pytest.raises(ConfigError, match=f"{option.name}"):
        resolve_config(phase, ["--config", str(config)] + base[2:])


def test_malformed_config_files_name_the_key(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("exp_name: x\nwarmup:\n  max_train_steps: 3\n")
    edit = tmp_path / "edit.yaml"
    edit.write_text("base: base.yaml\nwarmup: 5\n")
    with pytest.raises(ConfigError, match="edit.yaml: the 'warmup' section must be a mapping"):
        resolve_config("warmup", ["--config", str(edit)])
    for value in ("[a, b]", "{name: x}", "2024", "true"):
        edit.write_text(f"exp_name: {value}\n")
        with pytest.raises(ConfigError, match="bad value .* for 'exp_name' .*expected text"):
            resolve_config("warmup", ["--config", str(edit)])
    edit.write_text("exp_name: '2024'\ndata_dir: [a]\n")
    with pytest.raises(ConfigError, match="'data_dir'"):
        resolve_config("warmup", ["--config", str(edit)])
    edit.write_text("exp_name: '2024'\n")
    assert resolve_config("warmup", ["--config", str(edit)])["exp_name"] == "2024"


def test_config_precedence_defaults_yaml_section_flags():
    config = resolve_config("train", ["--config", TINY_CONFIG, "--proj-coeff", "0.25"])
    assert config["proj_coeff"] == 0.25          # flag over the train: section
    assert config["max_train_steps"] == 200      # train: section over the top level
    assert config["batch_size"] == 32            # top level over the default
    assert config["adam_beta2"] == 0.999         # default
    warmup = resolve_config("warmup", ["--config", TINY_CONFIG])
    assert warmup["exp_name"] == "tiny-warmup" and "encoder_depth" not in warmup


def test_base_config_is_edited_key_by_key():
    base = resolve_config("train", ["--config", os.path.join(os.path.dirname(TINY_CONFIG),
                                                                "table1_2_sit_xl2_erw.yaml")])
    edit = resolve_config("train", ["--config", os.path.join(os.path.dirname(TINY_CONFIG),
                                                                "table5_sit_xl2_teachers.yaml")])
    assert (base["encoder_depth"], edit["encoder_depth"]) == (18, 8)          # train: section overridden
    assert (base["warmup_depth"], edit["warmup_depth"]) == (5, 8)            # top level overridden
    assert edit["proj_coeff"] == base["proj_coeff"] == 0.5                    # inherited from base's train:
    assert edit["model"] == "SiT-XL/2" and edit["exp_name"] == "t5-sit-xl2"


def test_missing_data_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(Exception, match=str(missing)):
        train_warmup.main(tiny_args(missing, tmp_path, "--max-train-steps", "1"))
