"""Dataset sources: real CIFAR-10 / GTSRB / MNIST copies, every local format, the hub
reader, the on-disk cache, augmentation, and each bad-input error."""

from __future__ import annotations

import dataclasses
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_support import (
    coloured,
    dataset_cfg,
    idx_bytes,
    image_bytes,
    require,
    write_tar,
    write_tree,
    write_zip,
)

from flexmoe_core.config import ConfigError, load_settings
from flexmoe_core.data import (
    ArrayDataset,
    DatasetError,
    Normaliser,
    build_augment,
    load_client_data,
    load_dataset,
    load_raw,
    random_crop_flip,
)
from flexmoe_core.data.cache import load_or_build
from flexmoe_core.settings import AugmentSettings, DatasetSettings, PartitionSettings

pytestmark = pytest.mark.usefixtures("isolated_data_caches")

GTSRB_TRAIN_COUNTS = [210, 2220, 2250, 1410, 1980, 1860, 420, 1440, 1410, 1470, 2010, 1320,
    2100, 2160, 780, 630, 420, 1110, 1200, 210, 360, 330, 390, 510, 270, 1500, 600, 240, 540,
    270, 450, 780, 240, 689, 420, 1200, 390, 210, 2070, 300, 360, 240, 240]  # fmt: skip
GTSRB_TEST_COUNTS = [60, 720, 750, 450, 660, 630, 150, 450, 450, 480, 660, 420, 690, 720,
    270, 210, 150, 360, 390, 60, 90, 90, 120, 150, 90, 480, 180, 60, 150, 90, 150, 270, 60,
    210, 120, 390, 120, 60, 690, 90, 90, 60, 90]  # fmt: skip
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the whole session, so each real dataset decodes once."""
    path = tmp_path_factory.getbasetemp() / "flexmoe-data-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def cifar(shared_cache: Path):
    cfg = dataset_cfg("cifar10", shared_cache, path=require("cifar10_jpg"))
    return cfg, load_raw(cfg)


@pytest.fixture(scope="session")
def gtsrb(shared_cache: Path):
    cfg = dataset_cfg("gtsrb", shared_cache, path=require("gtsrb32"))
    return cfg, load_raw(cfg)


def _cfg(**entries: object):
    """A minimal dataset config for the synthetic tests."""
    base = {
        "name": "synthetic",
        "source": "imagefolder",
        "path": None,
        "num_classes": 3,
        "input_shape": [3, 8, 8],
        "test_fraction": None,
        "label_offset": 0,
        "cache_dir": None,
        "preprocess": {"mean": [0.5], "std": [0.25], "scale": 255.0, "augment": False},
    }
    base.update(entries)
    return DatasetSettings.from_mapping(base)


def _folder_files(ext: str = "png", fmt: str = "PNG") -> dict[str, bytes]:
    files = {}
    for split, per_class in (("train", 3), ("test", 1)):
        for label, name in enumerate(["ant", "bee", "cat"]):
            for i in range(per_class):
                files[f"{split}/{name}/{i:03d}.{ext}"] = image_bytes(coloured(label), fmt)
    return files


# --- real data -------------------------------------------------------------------------


def test_cifar10_jpeg_archives_have_the_official_counts(cifar) -> None:
    _, raw = cifar
    assert (len(raw.train), len(raw.test)) == (50_000, 10_000)
    assert raw.train.pixels.shape[1:] == (3, 32, 32) and raw.train.pixels.dtype == np.uint8
    assert np.bincount(raw.train.labels).tolist() == [5000] * 10
    assert np.bincount(raw.test.labels).tolist() == [1000] * 10
    assert raw.class_names[:3] == ("airplane", "automobile", "bird")
    # The README's mean training pixel (RGB 125.27 / 122.93 / 113.86).
    mean = raw.train.pixels.mean(axis=(0, 2, 3))
    np.testing.assert_allclose(mean, [125.27, 122.93, 113.86], atol=0.05)


def test_second_load_comes_from_the_memory_mapped_cache(cifar) -> None:
    cfg, first = cifar
    start = time.perf_counter()
    again = load_raw(cfg)
    assert time.perf_counter() - start < 5.0
    assert isinstance(again.train.pixels, np.memmap)
    assert not again.train.pixels.flags.writeable
    np.testing.assert_array_equal(again.test.pixels[:50], first.test.pixels[:50])


def test_gtsrb_official_layout_from_split_archives(gtsrb) -> None:
    _, raw = gtsrb
    assert (len(raw.train), len(raw.test)) == (39_209, 12_630)
    assert raw.num_classes == 43
    assert np.bincount(raw.train.labels, minlength=43).tolist() == GTSRB_TRAIN_COUNTS
    assert np.bincount(raw.test.labels, minlength=43).tolist() == GTSRB_TEST_COUNTS


def test_gtsrb_list_and_glob_paths_hit_the_same_cache(gtsrb, shared_cache: Path) -> None:
    folder = require("gtsrb32")
    archives = sorted(str(p) for p in folder.glob("*.tar.xz"))
    for path in (f"[{','.join(archives)}]", f"{folder}/gtsrb32-*.tar.xz"):
        start = time.perf_counter()
        raw = load_raw(dataset_cfg("gtsrb", shared_cache, path=path))
        assert time.perf_counter() - start < 5.0  # same files, same key: no decoding
        assert (len(raw.train), len(raw.test)) == (39_209, 12_630)


def test_mnist_test_idx_files(shared_cache: Path) -> None:
    folder = require("mnist_test")
    with pytest.raises(DatasetError, match="test_fraction"):
        load_raw(dataset_cfg("mnist", shared_cache, path=folder))
    raw = load_raw(dataset_cfg("mnist", shared_cache, path=folder, test_fraction=0.2), seed=3)
    assert len(raw.train) + len(raw.test) == 10_000
    assert len(raw.test) == pytest.approx(2_000, abs=10)
    counts = np.bincount(raw.train.labels) + np.bincount(raw.test.labels)
    assert counts.tolist() == MNIST_TEST_COUNTS
    assert raw.train.pixels.shape[1:] == (1, 28, 28)


def test_client_data_on_cifar_is_disjoint_covering_and_normalised(cifar) -> None:
    cfg, raw = cifar
    partition = PartitionSettings.from_mapping(
        {"type": "dirichlet", "alpha": 0.8, "min_partition_size": 10, "local_test_fraction": 0.2}
    )
    pixels_seen = 0
    labels = np.zeros(10, dtype=np.int64)
    for cid in range(4):
        data = load_client_data(cfg, partition, cid, 4, seed=0)
        assert data.train.x.dtype == np.float32 and data.train.x.shape[1:] == (3, 32, 32)
        assert len(data.global_test) == 10_000
        pixels_seen += len(data.train) + len(data.local_test)
        labels += np.bincount(np.concatenate([data.train.y, data.local_test.y]), minlength=10)
    assert pixels_seen == 50_000
    assert labels.tolist() == [5000] * 10
    # The lazily normalised global test subset equals the eager normalisation.
    sub = data.global_test.subset(np.arange(5))
    expected = Normaliser.from_settings(cfg.preprocess, 3)(raw.test.pixels[:5])
    np.testing.assert_allclose(sub.x, expected)


# --- local formats (synthetic) -----------------------------------------------------------


@pytest.mark.parametrize("container", ["folder", "tar.gz", "tar.xz", "zip"])
def test_imagefolder_reads_folders_and_archives_alike(tmp_path: Path, container: str) -> None:
    files = _folder_files()
    if container == "folder":
        path = write_tree(tmp_path / "tree", files)
    elif container == "zip":
        path = write_zip(tmp_path / "data.zip", files)
    else:
        path = write_tar(tmp_path / f"data.{container}", files)
    raw = load_raw(_cfg(path=str(path), cache_dir=str(tmp_path / "cache")))
    assert (len(raw.train), len(raw.test)) == (9, 3)
    assert raw.class_names == ("ant", "bee", "cat")
    assert raw.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # The colour encodes the label: decoding is exact for PNG.
    assert raw.train.pixels[:, 0, 0, 0].tolist() == [5, 5, 5, 25, 25, 25, 45, 45, 45]


def test_imagefolder_converts_and_resizes(tmp_path: Path) -> None:
    files = {
        "train/a/0.jpg": image_bytes(coloured(0, (20, 12)), "JPEG"),
        "train/b/0.ppm": image_bytes(coloured(1, (7, 9)), "PPM"),
        "test/a/0.png": image_bytes(coloured(0, (8, 8), channels=1)),
        "test/b/0.png": image_bytes(coloured(1, (8, 8))),
    }
    root = write_tree(tmp_path / "t", files)
    raw = load_raw(_cfg(path=str(root), num_classes=2, input_shape=[1, 16, 16]))
    assert raw.train.pixels.shape == (2, 1, 16, 16)
    assert raw.test.pixels.shape == (2, 1, 16, 16)


def test_unsplit_folder_gets_a_seeded_stratified_test_split(tmp_path: Path) -> None:
    files = {
        f"{c}/{i}.png": image_bytes(coloured(k)) for k, c in enumerate("xyz") for i in range(10)
    }
    root = write_tree(tmp_path / "pool", files)
    with pytest.raises(DatasetError, match="test_fraction"):
        load_raw(_cfg(path=str(root)))
    a = load_raw(_cfg(path=str(root), test_fraction=0.3), seed=1)
    b = load_raw(_cfg(path=str(root), test_fraction=0.3), seed=1)
    assert np.bincount(a.test.labels).tolist() == [3, 3, 3]
    np.testing.assert_array_equal(a.test.rows, b.test.rows)
    assert set(a.train.rows).isdisjoint(a.test.rows)


def test_gtsrb_layout_with_separately_shipped_test_labels(tmp_path: Path) -> None:
    train = {}
    for cls in (0, 1):
        folder = f"GTSRB/Final_Training/Images/{cls:05d}"
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for i in range(2):
            name = f"{cls:05d}_{i:05d}.ppm"
            train[f"{folder}/{name}"] = image_bytes(coloured(cls, (40, 30)), "PPM")
            rows.append(f"{name};40;30;5;5;35;25;{cls}")
        train[f"{folder}/GT-{cls:05d}.csv"] = "\r\n".join(rows).encode()
    test = {
        f"GTSRB/Final_Test/Images/{i:05d}.ppm": image_bytes(coloured(i % 2), "PPM")
        for i in range(3)
    }
    test["GTSRB/Final_Test/Images/GT-final_test.test.csv"] = b"Filename;Width\r\n00000.ppm;8\r\n"
    labels_csv = b"Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\r\n" + b"".join(
        f"{i:05d}.ppm;8;8;1;1;7;7;{i % 2}\r\n".encode() for i in range(3)
    )
    paths = [
        str(write_tar(tmp_path / "train.tar.xz", train)),
        str(write_zip(tmp_path / "test-images.zip", test)),
    ]
    cfg = _cfg(source="gtsrb", num_classes=2, input_shape=[3, 32, 32])
    with pytest.raises(DatasetError, match=r"GT-final_test\.csv"):
        load_raw(dataclasses.replace(cfg, path=tuple(paths)))
    paths.append(str(write_zip(tmp_path / "test-gt.zip", {"GT-final_test.csv": labels_csv})))
    raw = load_raw(dataclasses.replace(cfg, path=tuple(paths)))
    assert raw.train.labels.tolist() == [0, 0, 1, 1]
    assert raw.test.labels.tolist() == [0, 1, 0]
    assert raw.train.pixels.shape == (4, 3, 32, 32)


def test_idx_files_with_a_prefix_and_one_based_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 28, 28), dtype=np.uint8)
    labels = np.array([1, 2, 3, 1, 2, 3], dtype=np.uint8)  # 1-based, like EMNIST letters
    files = {}
    for split in ("train", "test"):
        files[f"emnist-letters-{split}-images-idx3-ubyte.gz"] = idx_bytes(images)
        files[f"emnist-letters-{split}-labels-idx1-ubyte.gz"] = idx_bytes(labels)
    root = write_tree(tmp_path / "emnist", files)
    cfg = _cfg(source="idx", path=str(root), input_shape=[1, 28, 28], idx_prefix="emnist-letters")
    with pytest.raises(DatasetError, match="label_offset=1"):
        load_raw(cfg)
    raw = load_raw(dataclasses.replace(cfg, label_offset=1))
    assert raw.train.labels.tolist() == [0, 1, 2, 0, 1, 2]
    np.testing.assert_array_equal(raw.train.pixels[:, 0], images)
    with pytest.raises(DatasetError, match="emnist-letters"):
        load_raw(dataclasses.replace(cfg, idx_prefix="emnist-balanced", label_offset=1))


def test_cifar_batches_in_an_archive(tmp_path: Path) -> None:
    def batch(labels: list[int]) -> bytes:
        data = np.stack([np.full(3072, 10 * k, np.uint8) for k in labels])
        return pickle.dumps({b"data": data, b"labels": labels}, protocol=2)

    files = {
        "cifar-10-batches-py/data_batch_2": batch([2, 0]),
        "cifar-10-batches-py/data_batch_1": batch([1, 1]),
        "cifar-10-batches-py/test_batch": batch([0, 2]),
        "cifar-10-batches-py/batches.meta": b"ignored",
    }
    archive = write_tar(tmp_path / "cifar-10-python.tar.gz", files)
    raw = load_raw(_cfg(source="cifar_batches", path=str(archive), input_shape=[3, 32, 32]))
    assert raw.train.labels.tolist() == [1, 1, 2, 0]  # data_batch_1 before data_batch_2
    assert raw.train.pixels[:, 0, 0, 0].tolist() == [10, 10, 20, 0]
    assert raw.test.labels.tolist() == [0, 2]


def test_cifar_batches_refuse_pickles_that_run_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    root = write_tree(tmp_path / "b", {"data_batch_1": pickle.dumps(Evil())})
    with pytest.raises(DatasetError, match="data_batch_1"):
        load_raw(_cfg(source="cifar_batches", path=str(root), input_shape=[3, 32, 32]))


# --- the hub reader (no network: an in-memory datasets.Dataset) ---------------------------


def _fake_hub(columns: tuple[str, str] = ("img", "label")):
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as HubImage
    from PIL import Image

    def split(labels: list[int]) -> Dataset:
        pictures = [Image.fromarray(coloured(k, (10, 10))) for k in labels]
        features = Features({columns[0]: HubImage(), columns[1]: ClassLabel(names=["a", "b", "c"])})
        return Dataset.from_dict({columns[0]: pictures, columns[1]: labels}, features=features)

    calls: list[tuple] = []

    def loader(hub_id, subset, revision):
        calls.append((hub_id, subset, revision))
        return DatasetDict({"train": split([0, 1, 2, 2]), "test": split([1, 0])})

    return loader, calls


def test_hub_source_decodes_and_is_cached(tmp_path: Path) -> None:
    loader, calls = _fake_hub()
    cfg = _cfg(
        source="imagefolder",  # path null: falls back to the hub id
        hf={"id": "uoft-cs/cifar10", "image_key": "img", "label_key": "label"},
        cache_dir=str(tmp_path / "cache"),
    )
    raw = load_raw(cfg, hub_loader=loader)
    assert raw.train.labels.tolist() == [0, 1, 2, 2]
    assert raw.test.labels.tolist() == [1, 0]
    assert raw.train.pixels.shape == (4, 3, 8, 8)
    assert raw.train.pixels[:, 0, 0, 0].tolist() == [5, 25, 45, 45]
    assert raw.class_names == ("a", "b", "c")
    assert raw.origin == "hf://uoft-cs/cifar10"
    load_raw(cfg, hub_loader=loader)
    assert len(calls) == 1  # the second load came from the cache


def test_hub_errors_name_the_fix(tmp_path: Path) -> None:
    loader, _ = _fake_hub(columns=("image", "label"))
    cfg = _cfg(source="hf", hf={"id": "x/y", "image_key": "img", "label_key": "label"})
    with pytest.raises(DatasetError, match=r"hf\.image_key"):
        load_raw(cfg, hub_loader=loader)

    def offline(*_args):
        raise ConnectionError("no network")

    with pytest.raises(DatasetError, match=r"dataset\.path"):
        load_raw(dataclasses.replace(cfg, name="other"), hub_loader=offline)


# --- bad input -------------------------------------------------------------------------------


def test_missing_path_and_empty_glob(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_raw(_cfg(path=str(tmp_path / "nope")))
    with pytest.raises(DatasetError, match="matches no file"):
        load_raw(_cfg(path=str(tmp_path / "*.tar.gz")))
    with pytest.raises(DatasetError, match=r"dataset\.path is null"):
        load_raw(_cfg(path=None))


def test_unknown_source_and_unreadable_formats(tmp_path: Path) -> None:
    # An unknown format is the schema's to refuse (once, naming the key).
    with pytest.raises(ConfigError, match=r"dataset\.source='parquet'"):
        load_settings(f"dataset.source=parquet dataset.path={tmp_path}")
    rar = tmp_path / "data.rar"
    rar.write_bytes(b"Rar!")
    with pytest.raises(DatasetError, match="cannot be read"):
        load_raw(_cfg(path=str(rar)))
    empty = write_tree(tmp_path / "docs", {"README.txt": b"hello"})
    with pytest.raises(DatasetError, match="no images"):
        load_raw(_cfg(path=str(empty)))


def test_archive_beside_its_unpacked_folder_is_refused(tmp_path: Path) -> None:
    files = _folder_files()
    root = write_tree(tmp_path / "cifar", files)
    write_tar(root / "cifar.tar.gz", files)
    with pytest.raises(DatasetError, match="found twice"):
        load_raw(_cfg(path=str(root)))


@pytest.mark.parametrize("suffix", ["tar.gz", "tar.xz", "zip"])
def test_corrupt_archive_names_the_file(tmp_path: Path, suffix: str) -> None:
    files = _folder_files()
    good = tmp_path / f"good.{suffix}"
    (write_zip if suffix == "zip" else write_tar)(good, files)
    bad = tmp_path / f"bad.{suffix}"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"bad\." + suffix.replace(".", r"\.")):
        load_raw(_cfg(path=str(bad)))


def test_corrupt_image_and_idx_files(tmp_path: Path) -> None:
    files = _folder_files()
    files["train/ant/broken.png"] = b"\x89PNG not really"
    with pytest.raises(DatasetError, match=r"broken\.png"):
        load_raw(_cfg(path=str(write_tree(tmp_path / "t", files))))
    images = idx_bytes(np.zeros((4, 28, 28), np.uint8), compress=False)
    idx = {
        "train-images-idx3-ubyte": images[:-10],
        "train-labels-idx1-ubyte": idx_bytes(np.zeros(4, np.uint8), compress=False),
    }
    with pytest.raises(DatasetError, match="truncated"):
        load_raw(
            _cfg(source="idx", path=str(write_tree(tmp_path / "i", idx)), input_shape=[1, 28, 28])
        )
    idx["train-images-idx3-ubyte"] = b"\x00\x00\x0d\x03" + images[4:]
    with pytest.raises(DatasetError, match="magic"):
        load_raw(
            _cfg(source="idx", path=str(write_tree(tmp_path / "j", idx)), input_shape=[1, 28, 28])
        )


def test_labels_outside_the_class_range(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "t", _folder_files())
    with pytest.raises(DatasetError, match="num_classes=3"):
        load_raw(_cfg(path=str(root), num_classes=2))
    with pytest.raises(DatasetError, match=r"not in dataset\.classes"):
        load_raw(_cfg(path=str(root), classes=["ant", "bee"]))


# --- cache ----------------------------------------------------------------------------------


def test_cache_is_keyed_by_file_changes(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "t", _folder_files())
    cfg = _cfg(path=str(root), cache_dir=str(tmp_path / "cache"))
    load_raw(cfg)
    (root / "train/ant/000.png").write_bytes(image_bytes(coloured(2)))
    raw = load_raw(cfg)
    assert raw.train.pixels[0, 0, 0, 0] == 45  # the changed file was decoded again
    assert len(list((tmp_path / "cache").glob("synthetic-*"))) == 2
    assert not list((tmp_path / "cache").glob(".*.tmp"))


def test_concurrent_builders_decode_once(tmp_path: Path) -> None:
    calls = []

    def build():
        calls.append(1)
        time.sleep(0.3)
        return {"x": np.arange(5)}, {"note": "built"}

    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(load_or_build(tmp_path, "d", {"k": 1}, build))
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert all(r[0]["x"].tolist() == [0, 1, 2, 3, 4] for r in results)


def test_unwritable_cache_warns_and_still_loads(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    root = write_tree(tmp_path / "t", _folder_files())
    with pytest.warns(UserWarning, match="cache_dir"):
        raw = load_raw(_cfg(path=str(root), cache_dir=str(blocker / "cache")))
    assert len(raw.train) == 9


# --- normalisation and augmentation ----------------------------------------------------------


def test_load_dataset_normalises_and_lazy_subsets_match(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "t", _folder_files())
    splits = load_dataset(_cfg(path=str(root)))
    np.testing.assert_allclose(splits.train.x[0, :, 0, 0], (5 / 255 - 0.5) / 0.25, rtol=1e-6)
    normaliser = Normaliser.from_config({"mean": [0.5], "std": [0.25], "scale": 255.0}, 3)
    pixels = np.arange(2 * 3 * 8 * 8, dtype=np.uint8).reshape(2, 3, 8, 8)
    lazy = ArrayDataset.from_pixels(pixels, np.array([0, 1]), normaliser)
    np.testing.assert_allclose(lazy.subset(np.array([1])).x, normaliser(pixels[1:]))
    with pytest.raises(DatasetError, match="2 values for 3 channels"):
        Normaliser.from_config({"mean": [0, 0], "std": [1], "scale": 1.0}, 3)


def test_random_crop_flip_is_seeded_and_crops_a_padded_window() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    a = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    b = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    assert a.shape == x.shape and torch.equal(a, b)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [
            w
            for top in range(5)
            for left in range(5)
            for w in (padded[i, :, top : top + 6, left : left + 6],)
        ]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(-1)) for w in windows)
    flipped = random_crop_flip(x, torch.Generator().manual_seed(1), padding=0)
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))


def test_build_augment_from_settings() -> None:
    assert build_augment(AugmentSettings.from_value(False)) is None
    assert build_augment(AugmentSettings.from_value(None)) is None
    assert build_augment(AugmentSettings(crop_padding=0, horizontal_flip=False)) is None
    aug = build_augment(AugmentSettings.from_value({"crop_padding": 4, "horizontal_flip": True}))
    assert aug is not None
    assert aug(torch.zeros(3, 3, 32, 32), torch.Generator()).shape == (3, 3, 32, 32)
    # A bad form or padding is the schema's to refuse, once, naming the key.
    with pytest.raises(ConfigError, match=r"dataset\.preprocess\.augment="):
        load_settings("dataset=cifar10 dataset.preprocess.augment=yes")
    with pytest.raises(ConfigError, match=r"dataset\.preprocess\.augment\.crop_padding"):
        load_settings("dataset=cifar10 dataset.preprocess.augment.crop_padding=-1")


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("group", ["cifar10", "emnist", "gtsrb", "mnist", "fashion_mnist"])
def test_dataset_configs_compose_and_default_to_the_hub(
    group: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flexmoe_core.data.raw import effective_source

    monkeypatch.delenv(f"FLEXMOE_{group.upper()}_PATH", raising=False)
    cfg = load_settings(f"dataset={group}").dataset
    assert cfg.path is None and effective_source(cfg) == "hf"
    assert len(cfg.input_shape) == 3 and cfg.num_classes >= 10
    assert len(cfg.preprocess.mean) == cfg.input_shape[0] == len(cfg.preprocess.std)
    monkeypatch.setenv(f"FLEXMOE_{group.upper()}_PATH", "/data/x")
    assert load_settings(f"dataset={group}").dataset.path == "/data/x"


def test_emnist_variant_selects_hub_id_and_idx_prefix() -> None:
    cfg = load_settings("dataset=emnist dataset.variant=balanced dataset.num_classes=47").dataset
    assert cfg.hf.id == "tanganke/emnist_balanced"
    assert cfg.idx_prefix == "emnist-balanced"


def test_digits_still_loads_offline() -> None:

    splits = load_dataset(load_settings("dataset=digits").dataset, seed=0)
    assert len(splits.train) + len(splits.test) == 1797
    assert splits.train.x.shape[1:] == (1, 8, 8)
    assert splits.train.x.min() >= 0.0 and splits.train.x.max() <= 1.0  # scale 16
