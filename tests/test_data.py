"""preprocessing/dataset_tools.py and erw/data.py: ADM crop, convert -> encode -> dataset, resume, checks, DDP."""
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from erw.data import ImageLatentDataset, check_data_dir, sample_latents
from models.vae import SD_VAE_SCALE, load_vae
from preprocessing import dataset_tools

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The same image encoded in batches of different sizes (or with other thread counts): CPU conv kernels may round
# differently. Against a float64 forward, the tiny VAE's float32 means (|m| up to ~17) are off by <= 2e-5, about
# 10 eps32 |m|; two float32 encodings differ by at most twice that. rtol=atol=1e-4 is >= 2.5x that everywhere
# (measured differences: 2e-5), and a wrong pixel scaling or posterior moves the moments by >= 1e-2.
BATCHING_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def reference_center_crop(image: PIL.Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's center_crop_arr, written with PIL's own crop box."""
    while image.size[0] >= 2 * size and image.size[1] >= 2 * size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), PIL.Image.BOX)
    factor = size / min(image.size)
    image = image.resize(tuple(int(round(s * factor)) for s in image.size), PIL.Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return np.array(image.crop((left, top, left + size, top + size)))


def random_image(width, height, seed):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width,height,size", [(1001, 777, 64), (300, 65, 32), (50, 41, 64), (129, 517, 32),
                                               (64, 64, 64)])
def test_center_crop_matches_pil_reference(width, height, size):
    image = random_image(width, height, seed=width)
    cropped = dataset_tools.center_crop_arr(image, size)
    assert cropped.shape == (size, size, 3) and cropped.dtype == np.uint8
    np.testing.assert_array_equal(cropped, reference_center_crop(image, size))


def test_file_names_follow_edm2():
    assert dataset_tools.image_relpath(12345) == "00012/img00012345.png"
    assert dataset_tools.latent_relpath("00012/img00012345.png") == "00012/img-mean-std-00012345.npy"


@pytest.fixture(scope="module")
def vae():
    return load_vae("random-tiny")


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """SOURCE/<class>/<images> of odd sizes, formats and name orders, one unreadable file, one stray file."""
    root = tmp_path_factory.mktemp("imagenet")
    layout = {"n02": [("z.JPEG", 70, 45), ("a.png", 33, 90)], "n01": [("b.jpg", 40, 40), ("sub/c.png", 61, 37)],
              "n03": [("d.bmp", 90, 33)]}
    for cls, files in layout.items():
        for name, w, h in files:
            path = root / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            random_image(w, h, seed=w * h).save(path)
    (root / "n03" / "broken.jpg").write_bytes(b"not an image")
    (root / "README.txt").write_text("stray")
    # Expected order: sorted class names (n01, n02, n03), then sorted relative paths inside each class.
    expected = [("n01/b.jpg", 0), ("n01/sub/c.png", 0), ("n02/a.png", 1), ("n02/z.JPEG", 1),
                ("n03/broken.jpg", 2), ("n03/d.bmp", 2)]
    return root, expected


@pytest.fixture(scope="module")
def converted(imagenet_like, tmp_path_factory):
    source, _ = imagenet_like
    data = tmp_path_factory.mktemp("data")
    dataset_tools.main(["convert", "--source", str(source), "--dest", str(data / "images"), "--resolution", "32",
                        "--workers", "0"])
    return data


def _encode(data, dest="vae-sd"):
    dataset_tools.main(["encode", "--source", str(data / "images"), "--dest", str(data / dest), "--vae",
                        "random-tiny", "--batch-size", "2", "--workers", "0", "--device", "cpu"])


@pytest.fixture(scope="module")
def encoded(converted):
    """The converted data encoded once, single process, into vae-sd/: the reference for the other encode runs."""
    _encode(converted)
    return converted


def test_convert_crops_and_labels_by_sorted_class_folder(imagenet_like, converted):
    source, expected = imagenet_like
    with open(converted / "images" / "dataset.json") as f:
        meta = json.load(f)
    assert meta["class_names"] == ["n01", "n02", "n03"]
    good = [(i, rel, label) for i, (rel, label) in enumerate(expected) if "broken" not in rel]
    assert meta["labels"] == [[f"00000/img{i:08d}.png", label] for i, _, label in good]
    for i, rel, _ in good:
        written = np.array(PIL.Image.open(converted / "images" / f"00000/img{i:08d}.png"))
        with PIL.Image.open(source / rel) as original:
            np.testing.assert_array_equal(written, reference_center_crop(original.convert("RGB"), 32))
    assert not (converted / "images" / "00000" / "img00000004.png").exists()


def test_reference_is_made_from_converted_images_alone(imagenet_like, converted, tmp_path):
    """A 50K reference at 512 px needs `convert` only: `reference` reads images/ and its dataset.json, no latents,
    spread evenly over the sorted files; an image of another size is refused naming it."""
    _, expected = imagenet_like
    data = tmp_path / "data"
    shutil.copytree(converted / "images", data / "images")
    out = tmp_path / "ref.npz"
    dataset_tools.main(["reference", "--data-dir", str(data), "--out", str(out), "--max-images", "3"])
    good = [(i, label) for i, (rel, label) in enumerate(expected) if "broken" not in rel]
    chosen = [good[k] for k in (0, 2, 4)]  # the first, middle and last of five: one of each class
    with np.load(out) as ref:
        pixels = [np.array(PIL.Image.open(data / "images" / f"00000/img{i:08d}.png")) for i, _ in chosen]
        np.testing.assert_array_equal(ref["arr_0"], np.stack(pixels))
        assert ref["arr_1"].tolist() == [label for _, label in chosen] == [0, 1, 2]
    PIL.Image.new("RGB", (16, 16)).save(data / "images" / "00000" / "img00000005.png")
    with pytest.raises(ValueError, match=r"img00000005\.png is 16x16, but .* is 32x32"):
        dataset_tools.main(["reference", "--data-dir", str(data), "--out", str(tmp_path / "other.npz")])
    assert not (tmp_path / "other.npz").exists()


def test_convert_reports_unreadable_by_path(imagenet_like, tmp_path, capsys):
    source, _ = imagenet_like
    dataset_tools.main(["convert", "--source", str(source), "--dest", str(tmp_path / "images"), "--resolution",
                        "32", "--workers", "0"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert str(source / "n03" / "broken.jpg") in text and "skipped 1 unreadable" in text
    assert "ignoring 1 file(s) at the top level" in text


def test_encode_round_trip_into_dataset(imagenet_like, encoded, vae):
    _, expected = imagenet_like
    converted = encoded
    with open(converted / "vae-sd" / "dataset.json") as f:
        labels = json.load(f)["labels"]
    good = [(i, label) for i, (rel, label) in enumerate(expected) if "broken" not in rel]
    assert labels == [[f"00000/img-mean-std-{i:08d}.npy", label] for i, label in good]

    dataset = ImageLatentDataset(str(converted))
    assert len(dataset) == len(good) and dataset.resolution == 32 and dataset.num_classes == 3
    for item, (i, label) in enumerate(good):
        image, moments, y = dataset[item]
        png = np.array(PIL.Image.open(converted / "images" / f"00000/img{i:08d}.png"))
        assert image.dtype == torch.uint8 and torch.equal(image, torch.from_numpy(png).permute(2, 0, 1))
        assert y.dtype == torch.int64 and int(y) == label
        with torch.no_grad():
            posterior = vae.encode(image[None].float() / 127.5 - 1).latent_dist
        assert moments.shape == (8, 4, 4) and moments.dtype == torch.float32
        torch.testing.assert_close(moments, torch.cat([posterior.mean, posterior.std], 1)[0], **BATCHING_TOLERANCE)


def test_encode_resumes_without_redoing_or_leaving_partial_files(encoded, monkeypatch):
    converted = encoded
    dest = converted / "vae-sd-resume"
    real_save = dataset_tools.save_npy_atomic
    calls = []

    def dying_save(array, path):
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        calls.append(path)
        return real_save(array, path)

    monkeypatch.setattr(dataset_tools, "save_npy_atomic", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _encode(converted, dest.name)
    assert len(list(dest.rglob("*.npy"))) == 3 and not (dest / "dataset.json").exists()
    (dest / "00000" / ".img-mean-std-00000005.npy.k3x9_q2a.tmp").write_bytes(b"half")  # a crash's leftover

    monkeypatch.setattr(dataset_tools, "save_npy_atomic", real_save)
    sentinel = np.full((8, 4, 4), 7.0, dtype=np.float32)
    np.save(calls[0], sentinel)  # finished files are skipped, not recomputed
    _encode(converted, dest.name)
    np.testing.assert_array_equal(np.load(calls[0]), sentinel)
    assert not list(dest.rglob("*.tmp"))
    reference = converted / "vae-sd"
    recomputed = [p for p in reference.rglob("*.npy") if str(dest / p.relative_to(reference)) != calls[0]]
    assert len(recomputed) == 4
    for path in recomputed:
        np.testing.assert_allclose(np.load(dest / path.relative_to(reference)), np.load(path), **BATCHING_TOLERANCE)
    written = json.load(open(dest / "dataset.json"))
    assert written["labels"] == json.load(open(reference / "dataset.json"))["labels"]
    assert written["identity"] == identity_of_files(converted / "images", dest)  # the sentinel's bytes included


def identity_of_files(images, latents):
    """The dataset identity (docs/data.md) recomputed from the files on disk with hashlib: per item, in sorted
    order, a line of image path, its sha256, latent path, its sha256 and label."""
    with open(latents / "dataset.json") as f:
        labels = json.load(f)["labels"]
    image_files = sorted(str(p.relative_to(images)) for p in images.rglob("*.png"))
    lines = {"items_sha256": [], "images_sha256": [], "sha256": []}
    for image, (latent, label) in zip(image_files, labels, strict=True):
        image_sha = hashlib.sha256((images / image).read_bytes()).hexdigest()
        latent_sha = hashlib.sha256((latents / latent).read_bytes()).hexdigest()
        lines["items_sha256"].append(f"{image}\t{latent}\t{label}\n")
        lines["images_sha256"].append(f"{image}\t{image_sha}\n")
        lines["sha256"].append(f"{image}\t{image_sha}\t{latent}\t{latent_sha}\t{label}\n")
    return {key: hashlib.sha256("".join(text).encode()).hexdigest() for key, text in lines.items()}


def test_encode_refuses_to_mix_vaes(encoded, tmp_path):
    converted = encoded
    load_vae("random-tiny").save_pretrained(tmp_path / "other-vae")
    with pytest.raises(ValueError, match="vae"):
        dataset_tools.main(["encode", "--source", str(converted / "images"), "--dest", str(converted / "vae-sd"),
                            "--vae", str(tmp_path / "other-vae"), "--workers", "0", "--device", "cpu"])


def _write_tiny_dataset(root, n=4, size=16):
    rng = np.random.default_rng(0)
    labels = []
    for i in range(n):
        img = dataset_tools.image_relpath(i)
        lat = dataset_tools.latent_relpath(img)
        os.makedirs(root / "images" / os.path.dirname(img), exist_ok=True)
        os.makedirs(root / "vae-sd" / os.path.dirname(lat), exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "images" / img)
        np.save(root / "vae-sd" / lat, rng.standard_normal((8, size // 8, size // 8)).astype(np.float32))
        labels.append([lat, i % 2])
    with open(root / "vae-sd" / "dataset.json", "w") as f:
        json.dump({"labels": labels}, f)
    return labels


def test_dataset_reads_repa_layout(tmp_path):
    labels = _write_tiny_dataset(tmp_path)
    dataset = ImageLatentDataset(str(tmp_path))
    assert [int(dataset[i][2]) for i in range(len(dataset))] == [label for _, label in labels]
    torch.testing.assert_close(dataset[2][1], torch.from_numpy(np.load(tmp_path / "vae-sd" / labels[2][0])))


@pytest.mark.parametrize("damage,message", [
    (lambda r: os.remove(r / "vae-sd/00000/img-mean-std-00000002.npy"), r"images/00000/img00000002\.png has no latent"),
    (lambda r: os.remove(r / "images/00000/img00000001.png"), r"latent .*img-mean-std-00000001\.npy has no image"),
    (lambda r: json.dump({"labels": [["00000/img-mean-std-00000000.npy", 0]]}, open(r / "vae-sd/dataset.json", "w")),
     r"no label for 00000/img-mean-std-00000001\.npy"),
    (lambda r: json.dump({"labels": _labels(r) + [["00000/img-mean-std-00000009.npy", 1]]},
                         open(r / "vae-sd/dataset.json", "w")), r"labels 00000/img-mean-std-00000009\.npy"),
    (lambda r: np.save(r / "vae-sd/00000/img-mean-std-00000000.npy", np.zeros((8, 4, 4), np.float32)),
     r"img00000000\.png \(16x16\) and .* do not fit"),
    (lambda r: os.remove(r / "vae-sd/dataset.json"), r"missing labels file .*vae-sd/dataset\.json"),
])
def test_dataset_names_the_first_mismatch(tmp_path, damage, message):
    _write_tiny_dataset(tmp_path)
    damage(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ImageLatentDataset(str(tmp_path))


def _labels(root):
    with open(root / "vae-sd/dataset.json") as f:
        return json.load(f)["labels"]


def test_corrupt_files_are_named_when_read(tmp_path):
    _write_tiny_dataset(tmp_path)
    dataset = ImageLatentDataset(str(tmp_path))
    (tmp_path / "vae-sd/00000/img-mean-std-00000003.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"img-mean-std-00000003\.npy"):
        dataset[3]
    (tmp_path / "images/00000/img00000002.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"img00000002\.png"):
        dataset[2]


def _copy_of_demo_data(demo_data, tmp_path):
    """A private copy of the session's demo dataset (64 px, latents (8, 8, 8)), safe to damage."""
    root = tmp_path / "data"
    shutil.copytree(demo_data, root)
    return root


def test_wrong_shape_latent_mid_dataset_is_named_by_the_loader(demo_data, tmp_path):
    root = _copy_of_demo_data(demo_data, tmp_path)
    dataset = ImageLatentDataset(str(root))
    bad = root / "vae-sd" / dataset.latent_files[37]
    np.save(bad, np.zeros((8, 4, 4), np.float32))  # a 32-px image's latent
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=0)
    with pytest.raises(ValueError) as raised:
        for _ in loader:
            pass
    message = str(raised.value)
    assert str(bad) in message and "(8, 4, 4)" in message and "(8, 8, 8)" in message and "encode" in message
    dataset[36], dataset[38]  # its neighbours still read


def test_wrong_size_image_mid_dataset_is_named_by_the_loader(demo_data, tmp_path):
    root = _copy_of_demo_data(demo_data, tmp_path)
    dataset = ImageLatentDataset(str(root))
    bad = root / "images" / dataset.image_files[50]
    random_image(32, 32, seed=1).save(bad)
    with pytest.raises(ValueError) as raised:
        dataset[50]
    message = str(raised.value)
    assert str(bad) in message and "(3, 32, 32)" in message and "(3, 64, 64)" in message and "convert" in message
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(48, 56)), batch_size=8)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        next(iter(loader))


@pytest.mark.parametrize("label,shown", [(3.7, "3.7"), (1.0, "1.0"), (True, "true"), ("1", '"1"'), (None, "null"),
                                         (-1, "-1")])
def test_labels_that_are_not_class_indices_are_refused(tmp_path, label, shown):
    labels = _write_tiny_dataset(tmp_path)
    labels[2][1] = label
    with open(tmp_path / "vae-sd/dataset.json", "w") as f:
        json.dump({"labels": labels}, f)
    with pytest.raises(ValueError, match=rf"dataset\.json.*00000/img-mean-std-00000002\.npy.*{re.escape(shown)}"):
        ImageLatentDataset(str(tmp_path))


def test_a_file_labelled_twice_differently_is_refused(tmp_path):
    labels = _write_tiny_dataset(tmp_path)
    relpath, label = labels[1]
    with open(tmp_path / "vae-sd/dataset.json", "w") as f:
        json.dump({"labels": labels + [[relpath, 1 - label]]}, f)
    with pytest.raises(ValueError, match=rf"dataset\.json.*{re.escape(relpath)}.*twice.*{label}.*{1 - label}"):
        ImageLatentDataset(str(tmp_path))
    with open(tmp_path / "vae-sd/dataset.json", "w") as f:  # listed twice with the same label: harmless
        json.dump({"labels": labels + [[relpath, label]]}, f)
    dataset = ImageLatentDataset(str(tmp_path))
    assert [int(dataset[i][2]) for i in range(len(dataset))] == [y for _, y in labels]


def test_check_data_dir_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        check_data_dir(str(tmp_path / "nowhere"))
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="no vae-sd/"):
        check_data_dir(str(tmp_path))


def test_sample_latents_is_scaled_reparameterisation():
    mean = torch.randn(3, 4, 2, 2)
    std = torch.rand(3, 4, 2, 2)
    z = sample_latents(torch.cat([mean, std], 1), generator=torch.Generator().manual_seed(5))
    eps = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, (mean + std * eps) * 0.18215)  # float32 defaults: the same 3 roundings
    assert SD_VAE_SCALE == 0.18215
    # Statistically: many draws of one posterior N(2, 0.5^2) have its scaled mean and std.
    moments = torch.cat([torch.full((20000, 4, 1, 1), 2.0), torch.full((20000, 4, 1, 1), 0.5)], dim=1)
    draws = sample_latents(moments)
    # statistical: 80000 draws, standard errors 3e-4 (mean) and 2e-4 (std); 0.005 is > 15 of them
    assert abs(draws.mean().item() - 2.0 * 0.18215) < 0.005 and abs(draws.std().item() - 0.5 * 0.18215) < 0.005


def test_make_demo_is_deterministic_and_class_coloured(tmp_path):
    args = ["--resolution", "32", "--num-classes", "8", "--images-per-class", "2", "--seed", "3", "--device", "cpu",
            "--vae", "random-tiny"]
    dataset_tools.main(["make-demo", "--dest", str(tmp_path / "a")] + args)
    dataset_tools.main(["make-demo", "--dest", str(tmp_path / "b")] + args)
    first, second = ImageLatentDataset(str(tmp_path / "a")), ImageLatentDataset(str(tmp_path / "b"))
    assert len(first) == 16 and first.num_classes == 8 and first.resolution == 32
    for i in range(len(first)):
        (img_a, mom_a, y_a), (img_b, mom_b, y_b) = first[i], second[i]
        assert torch.equal(img_a, img_b) and torch.equal(mom_a, mom_b) and int(y_a) == int(y_b) == i % 8
        # The class colour is present: some pixel within the colour jitter (+-25) plus noise/antialiasing margin.
        colour = torch.tensor(dataset_tools.DEMO_COLOURS[int(y_a)]).view(3, 1, 1)
        assert ((img_a.int() - colour).abs().max(dim=0).values <= 35).any(), i
    # The saved VAE is the one that encoded: re-encoding an image with it reproduces the stored moments.
    saved = load_vae(str(tmp_path / "a" / "vae"))
    image, moments, _ = first[5]
    with torch.no_grad():
        posterior = saved.encode(image[None].float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(moments, torch.cat([posterior.mean, posterior.std], 1)[0], **BATCHING_TOLERANCE)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_encode_data_parallel_with_torchrun_matches_single_process(encoded):
    """Two CPU processes (gloo) write the files and labels of the single-process run, and the identity of what they
    wrote."""
    converted = encoded
    dest = converted / "vae-sd-ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "preprocessing.dataset_tools", "encode",
               "--source", str(converted / "images"), "--dest", str(dest), "--vae", "random-tiny",
               "--batch-size", "2", "--workers", "0", "--device", "cpu"]
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es)" in result.stdout
    reference = converted / "vae-sd"
    files = sorted(p.relative_to(reference) for p in reference.rglob("*.npy"))
    assert files == sorted(p.relative_to(dest) for p in dest.rglob("*.npy"))
    for rel in files:
        np.testing.assert_allclose(np.load(dest / rel), np.load(reference / rel), **BATCHING_TOLERANCE)
    written = json.load(open(dest / "dataset.json"))
    assert written["labels"] == json.load(open(reference / "dataset.json"))["labels"]
    # Each process hashed its share; the identity is of every file, in item order (other batches: other last bits)
    assert written["identity"] == identity_of_files(converted / "images", dest)


#################################################################################
#        Counts, sizes and paths are checked where they enter                   #
#################################################################################

@pytest.mark.parametrize("argv, flag", [
    (["convert", "--source", "{demo}/images", "--dest", "{tmp}/out", "--max-images", "-1"], "--max-images"),
    (["convert", "--source", "{demo}/images", "--dest", "{tmp}/out", "--max-images", "0"], "--max-images"),
    (["convert", "--source", "{demo}/images", "--dest", "{tmp}/out", "--resolution", "0"], "--resolution"),
    (["convert", "--source", "{demo}/images", "--dest", "{tmp}/out", "--workers", "-1"], "--workers"),
    (["convert", "--source", "{demo}/images", "--dest", "{tmp}/afile"], "--dest"),
    (["encode", "--source", "{demo}/images", "--dest", "{tmp}/out", "--batch-size", "0"], "--batch-size"),
    (["encode", "--source", "{demo}/images", "--dest", "{tmp}/out", "--max-images", "-1"], "--max-images"),
    (["encode", "--source", "{demo}/images", "--dest", "{tmp}/out", "--workers", "-1"], "--workers"),
    (["encode", "--source", "{demo}/images", "--dest", "{tmp}/afile/vae-sd"], "--dest"),
    (["make-demo", "--dest", "{tmp}/out", "--images-per-class", "0"], "--images-per-class"),
    (["make-demo", "--dest", "{tmp}/out", "--num-classes", "11"], "--num-classes"),
    (["make-demo", "--dest", "{tmp}/out", "--resolution", "-16"], "--resolution"),
    (["make-demo", "--dest", "{tmp}/out", "--seed", "-1"], "--seed"),
    (["make-demo", "--dest", "{tmp}/out", "--batch-size", "0"], "--batch-size"),
    (["make-demo", "--dest", "{tmp}/afile"], "--dest"),
    (["reference", "--data-dir", "{demo}", "--out", "{tmp}/r.npz", "--max-images", "0"], "--max-images"),
    (["reference", "--data-dir", "{demo}", "--out", "{tmp}/r.npz", "--max-images", "-1"], "--max-images"),
    (["reference", "--data-dir", "{demo}", "--out", "{tmp}/adir"], "--out"),
    (["pack", "--data-dir", "{tmp}/nodata", "--workers", "-1"], "--workers"),
    (["cache-teachers", "--data-dir", "{demo}", "--enc-type", "random-vit-tiny", "--out", "{tmp}/c", "--workers", "-1"],
     "--workers"),
    (["cache-teachers", "--data-dir", "{demo}", "--enc-type", "random-vit-tiny", "--out", "{tmp}/afile"], "--out"),
])
def test_counts_sizes_and_output_paths_are_refused_where_they_enter(demo_data, tmp_path, capsys, argv, flag):
    """argparse names the flag, and nothing is written: `convert --max-images -1` once dropped the last image,
    `reference --max-images 0` wrote a 0-image .npz and -1 ended in a traceback, an output folder that is a file
    in a NotADirectoryError."""
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "adir").mkdir()
    fill = [arg.replace("{demo}", str(demo_data)).replace("{tmp}", str(tmp_path)) for arg in argv]
    with pytest.raises(SystemExit) as exited:
        dataset_tools.main(fill)
    assert exited.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["adir", "afile"] and not os.listdir(tmp_path / "adir")


#################################################################################
#        Every command that writes a folder holds it                            #
#################################################################################

@pytest.mark.parametrize("command", ["convert", "encode", "pack", "cache-teachers"])
def test_a_command_on_a_folder_another_command_holds_is_refused_and_deletes_nothing(demo_data, tmp_path, command):
    """Two cache-teachers on one --out: the second once deleted the first's in-flight shard as "stale" (its temp
    cleanup is recursive), and the first crashed. Here this process holds the folder, as a live command does; the
    command, a real process, exits 2 with one line naming this process, and leaves the live write's temp file."""
    from operations.lock import RunLock
    root = _copy_of_demo_data(demo_data, tmp_path)
    argv, held, temp = {
        "convert": (["--source", str(root / "images"), "--dest", str(tmp_path / "converted"), "--resolution", "64",
                     "--workers", "0"], tmp_path / "converted", "00000/.img00000003.png.abcd1234.tmp"),
        "encode": (["--source", str(root / "images"), "--dest", str(tmp_path / "latents"), "--vae", "random-tiny",
                    "--workers", "0", "--device", "cpu"], tmp_path / "latents", "00000/.x.npy.abcd1234.tmp"),
        "pack": (["--data-dir", str(root), "--workers", "0"], root / "packed", ".moments.npy.abcd1234.tmp"),
        "cache-teachers": (["--data-dir", str(root), "--enc-type", "random-vit-tiny", "--out", str(tmp_path / "cache"),
                            "--workers", "0", "--device", "cpu"], tmp_path / "cache", ".shard-00000.npy.abcd1234.tmp"),
    }[command]
    lock = RunLock(str(held)).acquire()
    try:
        (held / temp).parent.mkdir(parents=True, exist_ok=True)
        (held / temp).write_bytes(b"a live write")
        result = subprocess.run([sys.executable, "-m", "preprocessing.dataset_tools", command, *argv], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: {held} is in use by another run (host {socket.gethostname()}, PID {os.getpid()},")
    assert (held / temp).read_bytes() == b"a live write"


def test_unreadable_preprocess_settings_are_named_in_one_line(demo_data, tmp_path):
    dest = tmp_path / "converted"
    dest.mkdir()
    (dest / dataset_tools.SETTINGS_FILE).write_text("{ cut short")
    with pytest.raises(ValueError, match=rf"cannot read {re.escape(str(dest / dataset_tools.SETTINGS_FILE))}"):
        dataset_tools.main(["convert", "--source", str(demo_data / "images"), "--dest", str(dest), "--workers", "0",
                            "--resolution", "64"])
    assert sorted(os.listdir(dest)) == [dataset_tools.SETTINGS_FILE, "run.lock"]
