"""StoreDataset and ArrayDataset: decoding on the fly, labels, transforms, DataLoader workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpsd.integrations.torch")  # before torch: sets its OpenMP wait policy
torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader  # noqa: E402

import mpsd  # noqa: E402
from mpsd.errors import InputError, OptionError  # noqa: E402
from mpsd.integrations.torch.data import ArrayDataset, StoreDataset, channel_stats, images_to_tensor  # noqa: E402

pytestmark = pytest.mark.torch


class FakeArchive:
    """The part of mpsd.Archive that StoreDataset uses; counts decode calls."""

    decodes = 0

    def __init__(self, path: Path) -> None:
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, size=(10, 8, 8), dtype=np.uint8)
        self.labels = np.arange(10, dtype=np.int64) % 3
        self.classes = ["a", "b", "c"]
        self.image_shape = (8, 8, 1)
        self.dtype = np.dtype(np.uint8)

        class Meta:
            chunk_images = 4

        self.meta = Meta()

    def __len__(self) -> int:
        return 10

    def __getitem__(self, key: object) -> np.ndarray:
        FakeArchive.decodes += 1
        return self.images[key]  # type: ignore[index]

    def decode(self, key: object, *, kind: str = "image") -> np.ndarray:
        FakeArchive.decodes += 1
        return self.images[key][..., None].astype(np.float32) + 0.25  # type: ignore[index]


def fake_opener(path: Path) -> FakeArchive:
    return FakeArchive(path)


def test_images_to_tensor_and_stats() -> None:
    x = np.array([[[0, 255], [255, 0]]], dtype=np.uint8)
    t = images_to_tensor(x)
    assert t.shape == (1, 1, 2, 2) and t.dtype == torch.float32
    assert t.max().item() == 1.0
    mean, std = channel_stats(x)
    assert mean == [0.5] and std == [0.5]
    with pytest.raises(InputError):
        images_to_tensor(np.zeros((2, 3), np.uint8))


def test_array_dataset_batches_and_transform() -> None:
    x = np.arange(4 * 3 * 3 * 2, dtype=np.uint8).reshape(4, 3, 3, 2)
    ds = ArrayDataset(x, np.array([0, 1, 2, 3]), transform=lambda t: t * 2, target_transform=lambda y: y + 10)
    xi, yi = ds[1]
    assert xi.shape == (2, 3, 3)
    assert torch.allclose(xi, torch.from_numpy(x[1]).permute(2, 0, 1).float() / 255 * 2)
    assert yi.item() == 11
    xb, yb = next(iter(DataLoader(ds, batch_size=4)))
    assert xb.shape == (4, 2, 3, 3) and yb.tolist() == [10, 11, 12, 13]
    assert ArrayDataset(x).targets.tolist() == [-1] * 4


def test_store_dataset_over_fake_archive_with_chunk_cache() -> None:
    FakeArchive.decodes = 0
    ds = StoreDataset("fake", opener=fake_opener, indices=[9, 0, 5, 4])
    assert len(ds) == 4 and ds.classes == ["a", "b", "c"]
    assert ds.targets.tolist() == [0, 0, 2, 1]
    batch = ds.__getitems__([0, 1, 2, 3])
    ref = FakeArchive("x").images
    for (xi, yi), store_i in zip(batch, [9, 0, 5, 4], strict=True):
        assert torch.equal(xi, torch.from_numpy(ref[store_i]).float()[None] / 255)
        assert yi.item() == store_i % 3
    decodes = FakeArchive.decodes
    ds.__getitems__([3, 2, 1, 0])  # every chunk is cached now
    assert FakeArchive.decodes == decodes
    small = StoreDataset("fake", opener=fake_opener, cache_bytes=64 * 4)  # room for one chunk of 4
    small.__getitems__(list(range(10)))
    assert len(small._cache) == 1
    with pytest.raises(IndexError):
        ds[4]


def test_store_dataset_float_kind_and_no_cache() -> None:
    ds = StoreDataset("fake", opener=fake_opener, kind="float", cache_bytes=0)
    xi, _ = ds[2]
    ref = FakeArchive("x").images[2].astype(np.float32) + 0.25
    assert torch.allclose(xi[0], torch.from_numpy(np.clip(ref, 0, 255)) / 255)
    with pytest.raises(OptionError):
        StoreDataset("fake", opener=fake_opener, kind="png")
    with pytest.raises(OptionError):
        StoreDataset("fake", opener=fake_opener, indices=[10])


def test_store_dataset_pickles_without_its_handle() -> None:
    ds = StoreDataset("fake", opener=fake_opener)
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._archive is None and len(clone._cache) == 0
    assert torch.equal(clone[3][0], ds[3][0])  # reopens lazily


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(24, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, size=24)
    path = tmp_path_factory.mktemp("store") / "s.zarr"
    mpsd.compress(images, path, tol=0.0, labels=labels, chunk_images=5)
    return path, images, labels


def test_store_dataset_on_a_real_store(small_store: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, _, labels = small_store
    archive = mpsd.open(path)
    ds = StoreDataset(path, transform=lambda t: t.flip(2))
    assert len(ds) == 24 and ds.image_shape == (8, 8, 3)
    xb, yb = next(iter(DataLoader(ds, batch_size=24, shuffle=False)))
    expected = torch.from_numpy(archive[:].astype(np.float32)).permute(0, 3, 1, 2) / 255
    assert torch.equal(xb, expected.flip(3))
    assert yb.tolist() == labels.tolist()


def test_store_dataset_with_dataloader_workers(small_store: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, _, labels = small_store
    ds = StoreDataset(path, indices=np.arange(0, 24, 2))
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0))
    seen = []
    for xb, yb in loader:
        assert xb.shape[1:] == (3, 8, 8)
        seen.extend(yb.tolist())
    assert sorted(seen) == sorted(labels[::2].tolist())


def test_fit_trains_from_a_store_with_workers(small_store: tuple[Path, np.ndarray, np.ndarray]) -> None:
    from mpsd.integrations.torch.models import build_model
    from mpsd.integrations.torch.train import fit, get_recipe

    path, images, labels = small_store
    model = build_model("small_cnn", 3, 4, 8, width=4)
    recipe = get_recipe("cpu", max_epochs=2, patience=0, batch_size=8)
    result = fit(model, StoreDataset(path), ArrayDataset(images, labels), recipe, workers=2)
    assert result.epochs == 2 and result.steps == 6
