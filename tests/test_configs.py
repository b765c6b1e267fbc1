"""The paper configs and the README's commands for them: --encoder-depth auto (table 4), the table-3 sweeps, and the
ERW-release preset beside the paper preset. Each README command is run through the real config resolution."""
import os
import re
import shlex

import pytest

from operations.config import TRAIN, WARMUP, ConfigError, load_yaml, resolve_config
from tests.conftest import ROOT, TINY_CONFIG

README = os.path.join(ROOT, "README.md")
TABLE4 = os.path.join(ROOT, "configs", "table4_sit_b2_erw.yaml")
PAPER_PRESET = "table1_2_sit_xl2_erw.yaml"
RELEASE_PRESET = "table1_2_sit_xl2_erw_release.yaml"


def readme() -> str:
    with open(README) as f:
        return f.read()


def resolve_command(command: str):
    """(phase, resolved config) of an `accelerate launch ... train[_warmup].py FLAGS` command line."""
    words = shlex.split(command)
    script = next(i for i, w in enumerate(words) if w.endswith(".py"))
    phase = {"train.py": TRAIN, "train_warmup.py": WARMUP}[words[script]]
    argv = [os.path.join(ROOT, w) if w.startswith("configs/") else w for w in words[script + 1:]]
    return phase, resolve_config(phase, argv)


#################################################################################
#                        --encoder-depth auto (table 4)                         #
#################################################################################

@pytest.mark.parametrize("start", [0, 1, 2, 3, 4])
def test_auto_head_reads_the_last_warmed_block(start):
    # Table 4's k = 8 warmed blocks at START..START+7 (0-based): the head reads block START+7's output, which is
    # block START+8 in REPA's 1-based count.
    config = resolve_config(TRAIN, ["--config", TABLE4, "--warmup-layers", str(start)])
    assert config["encoder_depth"] == start + 8
    assert config["encoder_depth_source"] == f"auto: warmup_layers {start} + warmup_depth 8"
    given = resolve_config(TRAIN, ["--config", TABLE4, "--warmup-layers", str(start), "--encoder-depth", "6"])
    assert given["encoder_depth"] == 6 and given["encoder_depth_source"] == "given"


def test_auto_head_is_refused_where_it_means_nothing(tmp_path):
    with pytest.raises(ConfigError, match=r"--encoder-depth auto .*needs a warm start.*--warmup-ckpt"):
        resolve_config(TRAIN, ["--config", TABLE4, "--warmup-ckpt", "none"])
    with pytest.raises(ConfigError, match=r"flag --encoder-depth: bad value 'deep'.*an integer >= 1 or auto"):
        resolve_config(TRAIN, ["--config", TINY_CONFIG, "--encoder-depth", "deep"])
    with pytest.raises(ConfigError, match=r"bad value '0' for 'encoder_depth'"):
        resolve_config(TRAIN, ["--config", TINY_CONFIG, "--encoder-depth", "0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("exp_name: x\nwarmup:\n  encoder_depth: auto\n")
    with pytest.raises(ConfigError, match=r"'encoder_depth' does not apply to the warmup phase"):
        resolve_config(WARMUP, ["--config", str(bad)])


def test_readme_table4_commands_put_the_head_on_each_rows_last_block():
    rows = re.findall(r"^\| (\d+)-(\d+) \| blocks (\d+)\.\.(\d+) \| (\d+) \| `([^`]+)` \|$", readme(), re.MULTILINE)
    # The paper's table 4 rows, as printed (its last row's Y is the 0-based index of SiT-B/2's last block).
    assert [f"{x}-{y}" for x, y, *_ in rows] == ["0-8", "1-9", "2-10", "3-11", "4-11"]
    for x, _, first, last, head, command in rows:
        phase, config = resolve_command(command)
        assert phase == TRAIN and config["warmup_layers"] == int(x) == int(first)
        assert config["warmup_layers"] + config["warmup_depth"] - 1 == int(last) <= 11  # SiT-B/2 has 12 blocks
        assert config["encoder_depth"] == int(head) == int(last) + 1
        assert config["encoder_depth_source"].startswith("auto")


#################################################################################
#                             Table 3 sweep commands                            #
#################################################################################

TABLE3_ROWS = ({(k, 8, 0.5) for k in (3, 4, 5, 6, 8, 12)} | {(5, d, 0.5) for d in (10, 12, 14, 16, 18, 20)}
               | {(5, 18, lam) for lam in (0.1, 1.0, 2.0, 4.0, 6.0)})  # (ERW depth, proj. depth, lambda0)


def expand_shell(block: str):
    """The commands of a shell block of plain lines and `for VAR in VALUES; do ... done` loops (one level), with
    line continuations joined and $VAR substituted; comments dropped."""
    lines = [line.split("#")[0].rstrip() for line in block.replace("\\\n", " ").splitlines()]
    lines = [line.strip() for line in lines if line.strip()]
    commands, i = [], 0
    while i < len(lines):
        loop = re.fullmatch(r"for (\w+) in ([^;]+); do", lines[i])
        if not loop:
            commands.append(lines[i])
            i += 1
            continue
        end = lines.index("done", i)
        for value in loop.group(2).split():
            commands += [line.replace(f"${loop.group(1)}", value) for line in lines[i + 1:end]]
        i = end + 1
    return commands


def test_readme_table3_sweeps_cover_table3_from_its_base():
    text = readme()
    block = re.search(r"<!-- table 3 sweeps -->\n```\w*\n(.*?)```", text, re.DOTALL).group(1)
    phase1, phase2 = {}, []
    for command in expand_shell(block):
        phase, config = resolve_command(command)
        if phase == WARMUP:
            phase1[os.path.join(config["output_dir"], config["exp_name"], "checkpoints", "last.pt")] = config
        else:
            phase2.append(config)
    rows = set()
    for config in phase2:
        # Every Phase 2 starts from a Phase 1 of the block with the same ERW depth.
        assert phase1[config["warmup_ckpt"]]["warmup_depth"] == config["warmup_depth"]
        rows.add((config["warmup_depth"], config["encoder_depth"], config["proj_coeff"]))
    assert rows == TABLE3_ROWS and len(phase2) == len(TABLE3_ROWS)
    assert len({c["exp_name"] for c in phase2}) == len(phase2)  # no run writes into another's folder
    # The base the README names is the config itself, and the row it reproduces (table 3: FID 12.1).
    base = resolve_config(TRAIN, ["--config", os.path.join(ROOT, "configs", "table3_sit_xl2_ablation.yaml")])
    stated = re.search(r"`configs/table3_sit_xl2_ablation.yaml` \| .*base \(ERW depth, proj\. depth, lambda0\) = "
                       r"\((\d+), (\d+), ([\d.]+)\)", text)
    assert (base["warmup_depth"], base["encoder_depth"], base["proj_coeff"]) == \
        (int(stated.group(1)), int(stated.group(2)), float(stated.group(3))) == (5, 18, 0.5)


#################################################################################
#                      Table 5: one command per teacher row                     #
#################################################################################

# The paper's table 5 (section 4.4): its six target representations and their FIDs, by this codebase's names.
TABLE5_ROWS = {"mocov3-vit-b": 61.1, "mocov3-vit-l": 73.0, "clip-vit-L": 58.9, "dinov2-vit-b": 55.6,
               "dinov2-vit-l": 55.5, "dinov2-vit-g": 59.4}


def test_readme_runs_each_of_table5s_six_rows_with_one_command_from_one_config():
    from models.encoders import TEACHERS
    text = readme()
    block = re.search(r"<!-- table 5 rows -->\n```\w*\n(.*?)```", text, re.DOTALL).group(1)
    commands = expand_shell(block)
    stated = {teacher: float(fid) for teacher, fid in re.findall(r"^\| \S+ \| `(\S+)` \| .* \| (\d+\.\d) \|$", text,
                                                                  re.MULTILINE)}
    rows, names = {}, set()
    for command in commands:
        (phase1, warmup), (phase2, config) = (resolve_command(part) for part in command.split("&&"))
        assert (phase1, phase2) == (WARMUP, TRAIN)
        assert warmup["enc_type"] == config["enc_type"] in TEACHERS and warmup["enc_weights"] == config["enc_weights"]
        assert config["warmup_ckpt"] == os.path.join(warmup["output_dir"], warmup["exp_name"], "checkpoints",
                                                     "last.pt")
        assert (warmup["warmup_depth"], config["warmup_depth"], config["encoder_depth"]) == (8, 8, 8)
        assert warmup["align_loss"] == config["align_loss"] == "ntxent" and config["model"] == "SiT-XL/2"
        rows[config["enc_type"]] = stated[config["enc_type"]]
        names |= {warmup["exp_name"], config["exp_name"]}
    assert rows == TABLE5_ROWS and len(names) == 2 * len(TABLE5_ROWS)


#################################################################################
#                     The ERW release preset, beside the paper's                #
#################################################################################

def test_release_preset_differs_from_the_paper_preset_in_the_stated_keys():
    def resolved(name, phase):
        return resolve_config(phase, ["--config", os.path.join(ROOT, "configs", name)])

    differences = {}
    for phase in (WARMUP, TRAIN):
        paper, release = resolved(PAPER_PRESET, phase), resolved(RELEASE_PRESET, phase)
        assert paper.keys() == release.keys()
        differences[phase] = {k: release[k] for k in paper if paper[k] != release[k] and k != "config"}
    release_warmup = resolved(RELEASE_PRESET, WARMUP)
    # Phase 2 starts from the release's own Phase 1 (the release's bug: it did not).
    phase1_last = os.path.join(release_warmup["output_dir"], release_warmup["exp_name"], "checkpoints", "last.pt")
    # Written from the release's README command and train.py: l2r_depth 4, --encoder-depth 14, cosine, lambda0 6 for
    # XL, RoPE built in Phase 2 only, 100K + 200K steps, --allow-tf32 with fp16.
    release = {"warmup_depth": 4, "align_loss": "cosine", "allow_tf32": True}
    assert differences[WARMUP] == {"exp_name": "sit-xl2-erw-release-warmup", **release}
    assert differences[TRAIN] == {"exp_name": "sit-xl2-erw-release", **release, "encoder_depth": 14,
                                  "proj_coeff": 6.0, "use_rope": True, "add_rope_after_warmup": True,
                                  "max_train_steps": 200000, "warmup_ckpt": phase1_last}
    assert resolved(RELEASE_PRESET, WARMUP)["use_rope"] is False and resolved(RELEASE_PRESET, TRAIN)[
        "proj_half_life"] == 50000
    # The README's config table states the training differences, key by key.
    row = next(line for line in readme().splitlines() if line.startswith(f"| `configs/{RELEASE_PRESET}`"))
    stated = dict(re.findall(r"`(\w+): ([\w.]+)`", row))
    training = {k: v for phase in differences.values() for k, v in phase.items()
                if k not in ("exp_name", "warmup_ckpt")}
    assert {k: type(training[k])(v) if k in training else v for k, v in stated.items()} == training


#################################################################################
#                  Every paper config holds the paper's setting                 #
#################################################################################

# Written from the paper (section 4.1, tables 2-5, appendix D), REPA's paper for its baselines, and README's config
# table; the 50K half-life is the ERW release's (the paper gives none). A config's phase sees these after
# resolution (defaults < top level < phase section).
SHARED = dict(resolution=256, num_classes=1000, batch_size=256, learning_rate=1e-4, adam_beta1=0.9,
              adam_beta2=0.999, adam_weight_decay=0.0, max_grad_norm=1.0, ema_decay=0.9999, mixed_precision="fp16",
              cfg_prob=0.1)
ERW_PHASE2 = dict(path_type="linear", weighting="uniform", proj_decay="exp", proj_half_life=50000.0,
                  max_train_steps=100000)
PAPER = {
    ("table1_2_sit_xl2_erw.yaml", WARMUP): dict(model="SiT-XL/2", enc_type="dinov2-vit-b", warmup_depth=5,
                                                align_loss="ntxent", ntxent_temp=0.1, max_train_steps=100000),
    ("table1_2_sit_xl2_erw.yaml", TRAIN): dict(model="SiT-XL/2", enc_type="dinov2-vit-b", warmup_depth=5,
                                               encoder_depth=18, proj_coeff=0.5, align_loss="ntxent", **ERW_PHASE2),
    ("table3_sit_xl2_ablation.yaml", WARMUP): dict(model="SiT-XL/2", warmup_depth=5, max_train_steps=100000),
    ("table3_sit_xl2_ablation.yaml", TRAIN): dict(model="SiT-XL/2", warmup_depth=5, encoder_depth=18,
                                                  proj_coeff=0.5, **ERW_PHASE2),
    ("table5_sit_xl2_teachers.yaml", WARMUP): dict(model="SiT-XL/2", warmup_depth=8, max_train_steps=100000),
    ("table5_sit_xl2_teachers.yaml", TRAIN): dict(model="SiT-XL/2", warmup_depth=8, encoder_depth=8,
                                                  proj_coeff=0.5, **ERW_PHASE2),
    ("table4_sit_b2_erw.yaml", WARMUP): dict(model="SiT-B/2", enc_type="dinov2-vit-b", warmup_depth=8,
                                             align_loss="ntxent", max_train_steps=100000),
    ("table4_sit_b2_erw.yaml", TRAIN): dict(model="SiT-B/2", warmup_depth=8, warmup_layers=0, encoder_depth=8,
                                            proj_coeff=0.5, **ERW_PHASE2),
    ("table2_sit_xl2_repa.yaml", TRAIN): dict(model="SiT-XL/2", enc_type="dinov2-vit-b", align_loss="cosine",
                                              encoder_depth=8, proj_coeff=0.5, proj_decay="none", warmup_ckpt=None,
                                              path_type="linear", weighting="uniform"),
    ("table4_sit_b2_repa.yaml", TRAIN): dict(model="SiT-B/2", enc_type="dinov2-vit-b", align_loss="cosine",
                                             encoder_depth=4, proj_coeff=0.5, proj_decay="none", warmup_ckpt=None),
    ("table2_sit_xl2_sit.yaml", TRAIN): dict(model="SiT-XL/2", enc_type=None, warmup_ckpt=None),
    ("sit_b2_sit.yaml", TRAIN): dict(model="SiT-B/2", enc_type=None, warmup_ckpt=None),
    # 512 px (issue 33): the 256-px settings above at resolution 512, REPA's 512 run as the baseline
    ("sit_xl2_erw_512.yaml", WARMUP): dict(model="SiT-XL/2", enc_type="dinov2-vit-b", warmup_depth=5,
                                           align_loss="ntxent", max_train_steps=100000, resolution=512),
    ("sit_xl2_erw_512.yaml", TRAIN): dict(model="SiT-XL/2", enc_type="dinov2-vit-b", warmup_depth=5,
                                          encoder_depth=18, proj_coeff=0.5, resolution=512, **ERW_PHASE2),
    ("sit_xl2_repa_512.yaml", TRAIN): dict(model="SiT-XL/2", enc_type="dinov2-vit-b", align_loss="cosine",
                                           encoder_depth=8, proj_coeff=0.5, proj_decay="none", warmup_ckpt=None,
                                           resolution=512),
}


@pytest.mark.parametrize("name,phase", sorted(PAPER), ids=lambda v: str(v))
def test_each_paper_config_resolves_to_the_papers_setting(name, phase):
    config = resolve_config(phase, ["--config", os.path.join(ROOT, "configs", name)])
    expected = {**SHARED, **PAPER[(name, phase)]}
    assert {k: config[k] for k in expected} == expected


@pytest.mark.parametrize("name", sorted({n for n, p in PAPER if p == WARMUP}))
def test_each_phase2_starts_from_its_own_configs_phase1(name):
    """train.py --config X reads the last.pt that train_warmup.py --config X writes."""
    path = os.path.join(ROOT, "configs", name)
    warmup, phase2 = resolve_config(WARMUP, ["--config", path]), resolve_config(TRAIN, ["--config", path])
    assert phase2["warmup_ckpt"] == os.path.join(warmup["output_dir"], warmup["exp_name"], "checkpoints", "last.pt")
    assert phase2["warmup_depth"] == warmup["warmup_depth"] and phase2["exp_name"] != warmup["exp_name"]


def test_every_paper_config_is_checked():
    configs = {n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".yaml")}
    assert configs - {n for n, _ in PAPER} == {RELEASE_PRESET, "tiny.yaml"}  # the release preset: its own test


@pytest.mark.parametrize("text, key, lines", [
    ("learning_rate: 0.001\nbatch_size: 8\nlearning_rate: 0.5\n", "learning_rate", "1 and 3"),
    ("batch_size: 8\ntrain:\n  proj_coeff: 0.5\n  proj_coeff: 0\n", "proj_coeff", "3 and 4"),
], ids=["top-level", "in-a-section"])
def test_a_key_given_twice_is_refused_naming_the_key_and_the_file(tmp_path, text, key, lines):
    """yaml.safe_load keeps the last value without a word: the run would train with whichever came last."""
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"config file {path}: '{key}' is given twice \\(lines {lines}\\)"):
        load_yaml(str(path), TRAIN)


def test_a_yaml_merge_key_may_still_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("warmup: &common\n  batch_size: 8\n  max_train_steps: 5\n"
                    "train:\n  <<: *common\n  max_train_steps: 7\n")
    assert {k: load_yaml(str(path), TRAIN)[k] for k in ("batch_size", "max_train_steps")} == \
        {"batch_size": 8, "max_train_steps": 7}
