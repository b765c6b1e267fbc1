"""Training that reads no images: the teacher-token cache (erw/teacher_cache.py) and packed latents (erw/data.py)
against the live teacher and the per-file layout they replace."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import train
import train_warmup
from erw.cli import InvalidInput
from erw.data import ImageLatentDataset
from erw.teacher_cache import IDENTITY_FILE, TeacherCache, cached_teachers
from models.encoders import load_teachers
from preprocessing import dataset_tools
from tests.conftest import tiny_args


@pytest.fixture(scope="module")
def data(demo_data, tmp_path_factory):
    """A copy of the demo data (packing adds packed/, which must not reach other tests' data), its float32 and
    float16 caches of the random tiny teacher, and a packed copy."""
    root = tmp_path_factory.mktemp("cache-data")
    per_file = root / "per-file"
    shutil.copytree(demo_data, per_file)
    for dtype in ("float32", "float16"):
        dataset_tools.main(["cache-teachers", "--data-dir", str(per_file), "--enc-type", "random-vit-tiny",
                            "--out", str(root / dtype), "--dtype", dtype, "--batch-size", "48", "--workers", "0",
                            "--device", "cpu"])
    packed = root / "packed"
    shutil.copytree(per_file, packed)
    dataset_tools.main(["pack", "--data-dir", str(packed), "--workers", "0"])
    return root


def steps(result):
    return [record["align_loss"] for record in result["history"]]


def test_the_cache_holds_the_teachers_tokens_of_every_image(data):
    """float32: the live teacher's tokens of each image, computed here one image at a time (the cache batched 48):
    equal within what batching may change in float32 GEMMs (a few eps32 of the tokens' scale); float16: within its
    rounding, 2^-11 relative."""
    dataset = ImageLatentDataset(str(data / "per-file"))
    (teacher,) = load_teachers("random-vit-tiny", dataset.resolution)
    cache32, cache16 = TeacherCache(str(data / "float32")), TeacherCache(str(data / "float16"))
    assert len(cache32) == len(dataset) == 160 and cache32.identity.tokens == 16
    for index in (0, 17, 101, 159):  # shard 0 holds all 160: the last index is the last row
        image = dataset[index][0][None]
        live = teacher(image)[0].numpy()
        scale = float(np.abs(live).max())
        np.testing.assert_allclose(cache32.tokens(index), live, rtol=0, atol=64 * np.finfo(np.float32).eps * scale)
        np.testing.assert_allclose(cache16.tokens(index).astype(np.float32), live, rtol=2 ** -11,
                                   atol=2 ** -24 * 2)  # subnormal halves near zero


def test_a_cache_of_two_teachers_of_different_widths_is_the_live_pair(data, tmp_path):
    """Test-size MoCo v3 (48 wide) and CLIP (32 wide) side by side, float32: each cached teacher's slice is its live
    teacher's tokens (tolerance as above), the identity records both recipes, and a Phase-1 run from the cache trains
    what the live pair trains (tolerance as in the next test)."""
    pair = "random-tiny-mocov3-vit-b,random-tiny-clip-vit-L"
    dataset_tools.main(["cache-teachers", "--data-dir", str(data / "per-file"), "--enc-type", pair, "--out",
                        str(tmp_path / "cache"), "--dtype", "float32", "--batch-size", "48", "--workers", "0",
                        "--device", "cpu"])
    cache = TeacherCache(str(tmp_path / "cache"))
    live = load_teachers(pair, 64)
    assert cache.identity.widths == [48, 32] and live[0].preprocessing != live[1].preprocessing
    assert cache.identity.preprocessing == f"{live[0].preprocessing} | {live[1].preprocessing}"
    dataset = ImageLatentDataset(str(data / "per-file"))
    for index in (0, 17, 101, 159):
        cached = torch.from_numpy(cache.tokens(index))[None]
        for stand_in, teacher in zip(cached_teachers(cache.identity), live):
            tokens = teacher(dataset[index][0][None])
            scale = float(tokens.abs().max())
            torch.testing.assert_close(stand_in(cached), tokens, rtol=0, atol=64 * np.finfo(np.float32).eps * scale)
    common = ["--enc-type", pair, "--max-train-steps", "2", "--batch-size", "16"]
    from_live = train_warmup.main(tiny_args(data / "per-file", tmp_path / "live", *common))
    from_cache = train_warmup.main(tiny_args(data / "per-file", tmp_path / "cached", *common, "--teacher-cache",
                                             str(tmp_path / "cache")))
    np.testing.assert_allclose(steps(from_cache), steps(from_live), rtol=1e-4)


def test_a_run_from_a_float32_cache_trains_what_the_live_teacher_trains(data, tmp_path):
    """Phase 1 (the teacher's heaviest use), 4 steps: the same losses and weights within float32 rounding. The cached
    tokens differ from the live ones by a few eps32 (other batch shapes in the teacher's GEMMs); NT-Xent, Adam and
    the SiT pass that on at that relative size over 4 steps, so 1e-4 relative bounds it, while a wrong image's or
    teacher's tokens change the alignment loss by O(0.1)."""
    common = ["--max-train-steps", "4", "--batch-size", "16"]
    live = train_warmup.main(tiny_args(data / "per-file", tmp_path / "live", *common))
    cached = train_warmup.main(tiny_args(data / "per-file", tmp_path / "cached", *common,
                                         "--teacher-cache", str(data / "float32")))
    np.testing.assert_allclose(steps(cached), steps(live), rtol=1e-4)
    for (name, a), (_, b) in zip(live["model"].state_dict().items(), cached["model"].state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_a_float16_cache_stays_within_its_rounding(data, tmp_path):
    """The first step's loss sees the same weights: only the tokens differ, by <= 2^-11 relative (float16). The
    NT-Xent logits are cosines over tau = 0.1, so each moves by <= 2^-11 x 2 / tau, and the loss (a log-softmax)
    by at most twice that: 0.02."""
    common = ["--max-train-steps", "1", "--batch-size", "16"]
    live = train_warmup.main(tiny_args(data / "per-file", tmp_path / "live", *common))
    cached = train_warmup.main(tiny_args(data / "per-file", tmp_path / "cached", *common,
                                         "--teacher-cache", str(data / "float16")))
    assert abs(steps(cached)[0] - steps(live)[0]) <= 2 * 2 ** -11 * 2 / 0.1


@pytest.mark.parametrize("field, value", [("teachers", ["demo-vit-tiny"]), ("weights_sha256", ["0" * 64]),
                                          ("resolution", 128), ("preprocessing", "another"),
                                          ("num_images", 161), ("file_list_sha256", "f" * 64)])
def test_a_cache_made_for_other_settings_is_refused_naming_the_field(data, tmp_path, field, value):
    cache = tmp_path / "cache"
    shutil.copytree(data / "float32", cache)
    with open(cache / IDENTITY_FILE) as f:
        identity = json.load(f)
    identity[field] = value
    (cache / IDENTITY_FILE).write_text(json.dumps(identity))
    with pytest.raises(InvalidInput, match=rf"--teacher-cache .* other settings than this run's: {field}: cache has"):
        train_warmup.main(tiny_args(data / "per-file", tmp_path / "run", "--max-train-steps", "1",
                                    "--teacher-cache", str(cache)))


def test_a_cache_for_another_teacher_is_refused(data, tmp_path):
    with pytest.raises(InvalidInput, match=r"teachers: cache has \['random-vit-tiny'\], this run \['demo-vit-tiny'\]"):
        train_warmup.main(tiny_args(data / "per-file", tmp_path / "run", "--max-train-steps", "1",
                                    "--enc-type", "demo-vit-tiny", "--teacher-cache", str(data / "float32")))


def test_an_interrupted_cache_is_refused_and_resumed(data, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(data / "float32", cache)
    shard = cache / "shard-00000.npy"
    expected = np.load(shard)
    shard.unlink()
    with pytest.raises(InvalidInput, match="lacks 1 of 1 shards .*shard-00000.npy.* rerun"):
        TeacherCache(str(cache))
    dataset_tools.main(["cache-teachers", "--data-dir", str(data / "per-file"), "--enc-type", "random-vit-tiny",
                        "--out", str(cache), "--dtype", "float32", "--batch-size", "48", "--workers", "0",
                        "--device", "cpu"])
    np.testing.assert_array_equal(np.load(shard), expected)  # the same batches: bit for bit
    with pytest.raises(InvalidInput, match="other settings .*dtype: cache has 'float32', this run 'float16'"):
        dataset_tools.main(["cache-teachers", "--data-dir", str(data / "per-file"), "--enc-type", "random-vit-tiny",
                            "--out", str(cache), "--dtype", "float16", "--workers", "0", "--device", "cpu"])


def test_packed_latents_give_the_same_items_bit_for_bit(data):
    per_file, packed = ImageLatentDataset(str(data / "per-file")), ImageLatentDataset(str(data / "packed"))
    assert packed.packed and not per_file.packed and len(packed) == len(per_file)
    assert packed.image_files == per_file.image_files and packed.latent_files == per_file.latent_files
    for index in range(len(per_file)):
        for a, b in zip(per_file[index], packed[index]):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_training_on_packed_latents_equals_training_on_the_per_file_layout(data, tmp_path):
    common = ["--max-train-steps", "3", "--batch-size", "16", "--num-workers", "2"]
    per_file = train_warmup.main(tiny_args(data / "per-file", tmp_path / "a", *common))
    packed = train_warmup.main(tiny_args(data / "packed", tmp_path / "b", *common))
    assert steps(packed) == steps(per_file)
    for (name, a), (_, b) in zip(per_file["model"].state_dict().items(), packed["model"].state_dict().items()):
        assert torch.equal(a, b), name


def test_a_run_needs_no_image_folder_with_packed_latents_and_a_cache(data, tmp_path):
    """Both phases, after the images (and the per-file latents) are deleted."""
    folder = tmp_path / "data"
    shutil.copytree(data / "packed", folder)
    shutil.rmtree(folder / "images")
    shutil.rmtree(folder / "vae-sd")
    cache = ["--teacher-cache", str(data / "float16")]
    phase1 = train_warmup.main(tiny_args(folder, tmp_path / "runs", "--max-train-steps", "2", *cache))
    assert phase1["history"][-1]["align_loss"] > 0
    checkpoint = os.path.join(tmp_path, "runs", "tiny-warmup", "checkpoints", "last.pt")
    phase2 = train.main(tiny_args(folder, tmp_path / "runs", "--max-train-steps", "2", "--warmup-ckpt", checkpoint,
                                  "--vae", "random-tiny", "--sample-grid-every", "1000", *cache))
    assert phase2["history"][-1]["align_loss"] > 0 and phase2["history"][-1]["velocity_loss"] > 0
    with pytest.raises(Exception, match="no images/ subfolder, which a live teacher reads"):
        train_warmup.main(tiny_args(folder, tmp_path / "live", "--max-train-steps", "1"))


def test_two_processes_and_a_resume_train_from_the_cache_what_one_process_trains(data, tmp_path):
    """From packed latents and a float32 cache, without images: 2 processes (torchrun + gloo), stopped after 2 steps
    and resumed, against one process straight through. Tolerances as in test_training_paths.py's
    test_two_processes_train_what_one_process_trains (float32 summation order over the two halves of the batch)."""
    import subprocess
    import sys

    from erw.checkpoint import load_checkpoint
    from tests.conftest import ROOT
    from tests.dist_utils import free_port
    folder = tmp_path / "data"
    shutil.copytree(data / "packed", folder)
    shutil.rmtree(folder / "images")
    common = ["--max-train-steps", "4", "--log-every", "1", "--checkpointing-steps", "2", "--batch-size", "16",
              "--teacher-cache", str(data / "float32")]
    single = train_warmup.main(tiny_args(folder, tmp_path, "--exp-name", "one", *common))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "train_warmup.py"), *tiny_args(folder, tmp_path, "--exp-name", "two", *common)]
    for extra in (["--max-train-steps", "2"], ["--resume"]):
        proc = subprocess.run([*cmd, *extra], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(tmp_path, "two", "metrics.jsonl")) as f:
        losses_two = [json.loads(line)["loss"] for line in f]
    assert losses_two == pytest.approx([r["loss"] for r in single["history"]], rel=1e-5)
    one, two = (load_checkpoint(os.path.join(tmp_path, run, "checkpoints", "last.pt")) for run in ("one", "two"))
    assert one["step"] == two["step"] == 4
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=0, atol=1e-4, msg=name)


def test_two_processes_write_the_cache_one_process_writes(data, tmp_path):
    """torchrun with 2 processes, 5 shards of 32 images: process r writes shards r, r + 2, ... shard by shard, so
    each shard's batches are the single process's: the same bytes."""
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.dist_utils import free_port
    args = ["cache-teachers", "--data-dir", str(data / "per-file"), "--enc-type", "random-vit-tiny", "--dtype",
            "float32", "--shard-items", "32", "--batch-size", "16", "--workers", "0", "--device", "cpu"]
    dataset_tools.main([*args, "--out", str(tmp_path / "one")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m", "preprocessing.dataset_tools"]
    proc = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "two")], cwd=ROOT, capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(os.listdir(tmp_path / "two")) and len([n for n in names if n.startswith("shard")]) == 5
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
