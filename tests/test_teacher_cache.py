"""Training that reads no images: the teacher-token cache (operations/teacher_cache.py) and packed latents (erw/data.py)
against the live teacher and the per-file layout they replace."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
import train_warmup
from erw.data import ImageLatentDataset
from operations.teacher_cache import IDENTITY_FILE, TeacherCache, cached_teachers
from models.encoders import load_teachers
from models.vae import load_vae
from preprocessing import dataset_tools
from tests.conftest import ROOT, tiny_args


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
                                          ("num_images", 161), ("images_sha256", "f" * 64)])
def test_a_cache_made_for_other_settings_is_refused_naming_the_field(data, tmp_path, field, value):
    cache = tmp_path / "cache"
    shutil.copytree(data / "float32", cache)
    with open(cache / IDENTITY_FILE) as f:
        identity = json.load(f)
    identity[field] = value
    (cache / IDENTITY_FILE).write_text(json.dumps(identity))
    if field == "num_images":  # a cache of 161 images holds 161 rows
        tokens = np.load(cache / "shard-00000.npy")
        np.save(cache / "shard-00000.npy", np.concatenate([tokens, tokens[:1]]))
    with pytest.raises(ValueError, match=rf"--teacher-cache .* other settings than this run's: {field}: cache has"):
        train_warmup.main(tiny_args(data / "per-file", tmp_path / "run", "--max-train-steps", "1",
                                    "--teacher-cache", str(cache)))


def test_a_cache_for_another_teacher_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match=r"teachers: cache has \['random-vit-tiny'\], this run \['demo-vit-tiny'\]"):
        train_warmup.main(tiny_args(data / "per-file", tmp_path / "run", "--max-train-steps", "1",
                                    "--enc-type", "demo-vit-tiny", "--teacher-cache", str(data / "float32")))


def test_an_interrupted_cache_is_refused_and_resumed(data, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(data / "float32", cache)
    shard = cache / "shard-00000.npy"
    expected = np.load(shard)
    shard.unlink()
    with pytest.raises(ValueError, match="lacks 1 of 1 shards .*shard-00000.npy.* rerun"):
        TeacherCache(str(cache))
    dataset_tools.main(["cache-teachers", "--data-dir", str(data / "per-file"), "--enc-type", "random-vit-tiny",
                        "--out", str(cache), "--dtype", "float32", "--batch-size", "48", "--workers", "0",
                        "--device", "cpu"])
    np.testing.assert_array_equal(np.load(shard), expected)  # the same batches: bit for bit
    with pytest.raises(ValueError, match="other settings .*dtype: cache has 'float32', this run 'float16'"):
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
    from operations.checkpoint import load_checkpoint
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


#################################################################################
#             What is derived from a dataset is used only with it               #
#################################################################################

def _copy(source, tmp_path, name="data"):
    folder = tmp_path / name
    shutil.copytree(source, folder)
    return folder


def _pack(folder, capsys):
    dataset_tools.main(["pack", "--data-dir", str(folder), "--workers", "0"])
    return capsys.readouterr().out


def _packed_equals_per_file(folder):
    """The pack holds the per-file layout's current latents and labels, item for item."""
    per_file = ImageLatentDataset(str(folder), load_images=False, read_packed=False)
    moments = np.load(folder / "packed" / "moments.npy")
    assert len(moments) == len(per_file) and np.array_equal(np.load(folder / "packed" / "labels.npy"), per_file.labels)
    for index, latent in enumerate(per_file.latent_files):
        assert np.array_equal(moments[index], np.load(folder / "vae-sd" / latent)), latent


def _encode(folder, vae="random-tiny"):
    dataset_tools.main(["encode", "--source", str(folder / "images"), "--dest", str(folder / "vae-sd"), "--vae",
                        str(vae), "--workers", "0", "--device", "cpu"])


@pytest.fixture
def small_packed(tmp_path, capsys):
    """A packed demo folder of 20 images, made where it stays (encode compares its --source with the one it
    recorded, so a copied folder would need its settings rewritten)."""
    folder = tmp_path / "data"
    dataset_tools.main(["make-demo", "--dest", str(folder), "--images-per-class", "2", "--vae", "random-tiny",
                        "--device", "cpu"])
    _pack(folder, capsys)
    return folder


def test_a_pack_that_still_holds_a_deleted_item_is_refused_by_training_and_packed_again(small_packed, tmp_path,
                                                                                         capsys):
    """Item 7 deleted (image, latent, its label in vae-sd/dataset.json) after packing: training once read all
    packed items, the deleted one's latent and label included, and pack answered "packed already"."""
    folder = small_packed
    os.remove(folder / "images" / "00000" / "img00000007.png")
    os.remove(folder / "vae-sd" / "00000" / "img-mean-std-00000007.npy")
    with open(folder / "vae-sd" / "dataset.json") as f:
        content = json.load(f)
    content["labels"] = [entry for entry in content["labels"] if entry[0] != "00000/img-mean-std-00000007.npy"]
    (folder / "vae-sd" / "dataset.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"packed/ of .* is stale: .*dataset\.json labels 19 latents now, and not "
                                           r"the 20 items packed; rerun .*pack"):
        train_warmup.main(tiny_args(folder, tmp_path / "run", "--max-train-steps", "1", "--batch-size", "8"))
    # The deletion has to reach the dataset identity first: encode rehashes (nothing to encode), then pack packs.
    with pytest.raises(ValueError, match=r"pack needs the dataset identity .* is of other items .* encode"):
        _pack(folder, capsys)
    assert "packed already" not in capsys.readouterr().out
    _encode(folder)
    assert "packing again" in _pack(folder, capsys)
    assert "00000/img-mean-std-00000007.npy" not in ImageLatentDataset(str(folder)).latent_files
    _packed_equals_per_file(folder)


def test_a_pack_of_latents_encoded_again_is_refused_by_training_and_packed_again(small_packed, tmp_path, capsys):
    """vae-sd/ encoded again after packing (here with another VAE): the same file names and labels, other moments.
    Training once used the old moments, and pack answered "packed already"."""
    folder = small_packed
    vae = load_vae("random-tiny")
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.mul_(0.9)
    vae.save_pretrained(tmp_path / "other-vae")
    shutil.rmtree(folder / "vae-sd")
    _encode(folder, tmp_path / "other-vae")
    with pytest.raises(ValueError, match=r"packed/ of .* is stale: .*dataset\.json records another dataset identity "
                                           r"\(vae-sd/ was encoded again"):
        train_warmup.main(tiny_args(folder, tmp_path / "run", "--max-train-steps", "1", "--batch-size", "8"))
    out = _pack(folder, capsys)
    assert "packing again" in out and "packed already" not in out
    _packed_equals_per_file(folder)
    assert "packed already" in _pack(folder, capsys)  # and a pack that is current is left as it is


@pytest.mark.parametrize("edit", ["rotated by one", "outside the data folder"])
def test_a_packed_index_pointing_at_other_images_is_refused(data, tmp_path, edit):
    """With a live teacher, image i + 1 once trained beside latent i."""
    folder = _copy(data / "packed", tmp_path)
    with open(folder / "packed" / "index.json") as f:
        index = json.load(f)
    images = index["image_files"]
    index["image_files"] = images[1:] + images[:1] if edit == "rotated by one" else \
        images[:3] + ["../../elsewhere/00000/img00000003.png"] + images[4:]
    (folder / "packed" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index\.json and .*labels\.npy do not hold the items the pack recorded"):
        ImageLatentDataset(str(folder))


def test_a_cache_of_another_dataset_with_the_same_file_names_is_refused(data, tmp_path):
    """make-demo (like convert) names files by index: another seed gives the same 160 names and labels and other
    images. Their file list once passed for the cache's."""
    other = tmp_path / "other"
    dataset_tools.main(["make-demo", "--dest", str(other), "--images-per-class", "16", "--vae", "random-tiny",
                        "--seed", "1", "--device", "cpu"])
    assert ImageLatentDataset(str(other)).image_files == ImageLatentDataset(str(data / "per-file")).image_files
    with pytest.raises(ValueError, match=r"--teacher-cache .* other settings than this run's: images_sha256: cache "
                                           r"has '[0-9a-f]{64}', this run '[0-9a-f]{64}'; make a cache"):
        train_warmup.main(tiny_args(other, tmp_path / "run", "--max-train-steps", "1",
                                    "--teacher-cache", str(data / "float32")))
    # A folder that records no identity (REPA's tools, an older version) cannot be shown to be the cache's.
    folder = _copy(data / "per-file", tmp_path)
    with open(folder / "vae-sd" / "dataset.json") as f:
        content = json.load(f)
    (folder / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": content["labels"]}))
    with pytest.raises(ValueError, match=r"--teacher-cache needs the dataset identity .* records none .* encode"):
        train_warmup.main(tiny_args(folder, tmp_path / "run2", "--max-train-steps", "1",
                                    "--teacher-cache", str(data / "float32")))


def test_a_folder_without_an_identity_gets_one_from_encode_without_encoding_again(small_packed):
    """A data folder made by REPA's tools (or an older version) records no identity: pack refuses it, saying to run
    encode, which finds every latent done, hashes the files and records the identity they had."""
    folder = small_packed
    shutil.rmtree(folder / "packed")
    labels_path = folder / "vae-sd" / "dataset.json"
    with open(labels_path) as f:
        content = json.load(f)
    labels_path.write_text(json.dumps({"labels": content["labels"]}))
    with pytest.raises(ValueError, match="pack needs the dataset identity .* records none"):
        dataset_tools.main(["pack", "--data-dir", str(folder), "--workers", "0"])
    latents = {p: p.stat().st_mtime_ns for p in (folder / "vae-sd").rglob("*.npy")}
    _encode(folder)
    assert {p: p.stat().st_mtime_ns for p in (folder / "vae-sd").rglob("*.npy")} == latents
    with open(labels_path) as f:
        assert json.load(f) == content  # the identity encode recorded first: the same bytes, the same identity
    dataset_tools.main(["pack", "--data-dir", str(folder), "--workers", "0"])
    assert ImageLatentDataset(str(folder)).packed


#################################################################################
#           Damaged caches and packs: one line naming the file, up front        #
#################################################################################

def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_a_truncated_cache_shard_is_named_in_one_line_before_training(data, tmp_path):
    """Once `ValueError: mmap length is greater than file size`, naming no file, from the first batch that read it."""
    cache = _copy(data / "float32", tmp_path, "cache")
    _truncate(cache / "shard-00000.npy")
    with pytest.raises(ValueError, match="shard-00000.npy: mmap length"):
        TeacherCache(str(cache))  # when the cache is opened, not when a worker first reads the shard
    command = [sys.executable, os.path.join(ROOT, "train_warmup.py"),
               *tiny_args(data / "per-file", tmp_path / "run", "--max-train-steps", "1", "--teacher-cache", str(cache))]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: ") and "Traceback" not in result.stderr, \
        result.stderr[-3000:]
    assert f"cannot read the teacher cache shard {cache / 'shard-00000.npy'}: mmap length" in lines[-1]


def test_a_truncated_packed_moments_file_is_named(data, tmp_path):
    folder = _copy(data / "packed", tmp_path)
    _truncate(folder / "packed" / "moments.npy")
    moments = re.escape(str(folder / "packed" / "moments.npy"))
    with pytest.raises(ValueError, match=rf"cannot read the packed moments {moments}: mmap length is greater than "
                                           r"file size \(truncated"):
        ImageLatentDataset(str(folder), load_images=False)


def _empty_pack(folder):
    with open(folder / "packed" / "index.json") as f:
        index = json.load(f)
    index.update(num_items=0, image_files=[], latent_files=[])
    (folder / "packed" / "index.json").write_text(json.dumps(index))
    np.save(folder / "packed" / "labels.npy", np.zeros(0, np.int64))
    np.save(folder / "packed" / "moments.npy", np.zeros((0, 8, 8, 8), np.float32))


@pytest.mark.parametrize("damage, message", [
    (lambda f: np.save(f / "packed/labels.npy", np.where(np.arange(160) == 5, -3, np.arange(160) % 10)),
     r"labels\.npy gives item 5 \(00000/img-mean-std-00000005\.npy\) the negative class -3"),
    (lambda f: np.save(f / "packed/labels.npy", (np.arange(160) % 10).astype(np.float64)),
     r"labels\.npy holds float64 \(160,\), not integer class indices"),
    (_empty_pack, r"packed dataset .*index\.json holds no items"),
])
def test_packed_labels_that_are_not_class_indices_are_refused_up_front(data, tmp_path, damage, message):
    """As the per-file layout refuses them when it reads dataset.json; packed, a negative label once trained until
    it was drawn, float labels ended in a RuntimeError, an empty pack in a zero-size ValueError."""
    folder = _copy(data / "packed", tmp_path)
    damage(folder)
    with pytest.raises(ValueError, match=message):
        ImageLatentDataset(str(folder), load_images=False)


@pytest.mark.parametrize("field, value, shown", [
    ("shard_items", 0, "shard_items is 0, not an integer >= 1"),
    ("tokens", "16", 'tokens is "16", not an integer >= 1'),
    ("num_images", True, "num_images is true, not an integer >= 1"),
    ("dtype", "int8", 'dtype is "int8", not one of float16, float32'),
    ("widths", [64, 0], "widths is [64, 0], not a list of integers >= 1"),
    ("teachers", ["random-vit-tiny", "demo-vit-tiny"], "teachers, weights_sha256 and widths have 2, 1 and 1 entries"),
])
def test_identity_fields_of_another_type_or_range_are_refused_naming_the_field(data, tmp_path, field, value, shown):
    """`"shard_items": 0` once ended in a ZeroDivisionError."""
    cache = _copy(data / "float32", tmp_path, "cache")
    with open(cache / IDENTITY_FILE) as f:
        identity = json.load(f)
    identity[field] = value
    (cache / IDENTITY_FILE).write_text(json.dumps(identity))
    with pytest.raises(ValueError, match=rf"teacher cache identity .*{IDENTITY_FILE}: {re.escape(shown)}"):
        TeacherCache(str(cache))


def test_cache_teachers_refused_for_a_flag_writes_nothing_and_an_identity_without_shards_blocks_no_rerun(data,
                                                                                                         tmp_path,
                                                                                                         capsys):
    """--shard-items -5 once exited 0 having written only identity.json; 0 and --batch-size 0 ended in tracebacks,
    and the identity.json that --shard-items 0 left blocked the corrected command."""
    out = tmp_path / "cache"
    command = ["cache-teachers", "--data-dir", str(data / "per-file"), "--enc-type", "random-vit-tiny", "--out",
               str(out), "--dtype", "float32", "--workers", "0", "--device", "cpu"]
    for flag, bad in (("--shard-items", "-5"), ("--shard-items", "0"), ("--batch-size", "0")):
        with pytest.raises(SystemExit) as exited:
            dataset_tools.main([*command, flag, bad])
        assert exited.value.code == 2 and f"argument {flag}: must be in [1, inf), got {bad}" in capsys.readouterr().err
        assert not out.exists()
    out.mkdir()  # what the old command left: an identity of shard_items 0, and no shard
    with open(data / "float32" / IDENTITY_FILE) as f:
        identity = json.load(f)
    (out / IDENTITY_FILE).write_text(json.dumps({**identity, "shard_items": 0}))
    dataset_tools.main([*command, "--batch-size", "48"])
    for name in (IDENTITY_FILE, "shard-00000.npy"):
        assert (out / name).read_bytes() == (data / "float32" / name).read_bytes(), name


def test_a_pack_refused_half_way_leaves_no_temp_file(data, tmp_path):
    """A latent of another shape mid-dataset: once the full-size packed/.moments.npy.*.tmp stayed (42 GB on
    ImageNet) until the next pack."""
    folder = _copy(data / "per-file", tmp_path)
    bad = folder / "vae-sd" / "00000" / "img-mean-std-00000100.npy"
    np.save(bad, np.zeros((8, 4, 4), np.float32))
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        dataset_tools.main(["pack", "--data-dir", str(folder), "--workers", "0"])
    assert not [name for name in os.listdir(folder / "packed") if name.endswith(".tmp")]
    assert not (folder / "packed" / "index.json").exists()
