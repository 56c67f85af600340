"""The feature cache on disk: the folder key, the row writer, and the readers training and search use."""
import json

import numpy as np
import pytest
import torch

from captioning.features.encoders import EncoderSpec
from captioning.features.store import (RowWriter, cache_dir_for, feature_stats, load_features, load_unique, open_store)
from captioning.utils import CaptioningError


def make_cache(folder, grid):
    """A finished cache holding `grid` [N, P, C], written the way features.py writes one: preallocated
    .npy files filled row by row through RowWriter, then progress.json."""
    folder.mkdir(parents=True)
    n = grid.shape[0]
    for name, shape in (("grid", grid.shape), ("pooled", (n, grid.shape[2]))):
        np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float16, shape=shape).flush()
    writers = RowWriter(folder / "grid.npy"), RowWriter(folder / "pooled.npy")
    for row in reversed(range(n)):                         # any order: each row lands at its own offset
        writers[0].write(row, grid[row])
        writers[1].write(row, grid[row].mean(0))
    for w in writers:
        w.flush()
        w.close()
    (folder / "images.json").write_text(json.dumps([f"img{i}.jpg" for i in range(n)]))
    (folder / "progress.json").write_text(json.dumps({"complete": True, "bad": [], "grid_hw": [2, 2]}))
    return open_store(folder)


@pytest.fixture
def cache(tmp_path):
    grid = np.random.default_rng(0).normal(3.0, 2.0, size=(300, 4, 6)).astype(np.float16)
    return make_cache(tmp_path / "cache" / "x", grid), grid


def test_rows_written_are_rows_read(cache):
    store, grid = cache
    assert np.array_equal(store.grid, grid) and store.grid_size == 4 and store.channels == 6
    assert np.allclose(store.pooled, grid.mean(1), atol=1e-3)
    assert isinstance(store.grid, np.memmap)               # read on demand, not loaded whole


def test_features_for_repeated_rows(cache):
    store, grid = cache
    rows = torch.tensor([7, 3, 7, 7, 0])
    feats, index = load_unique(store, rows, True, "cpu")
    assert feats.shape[0] == 3                             # each image read once
    assert torch.equal(feats[index], torch.from_numpy(grid[[7, 3, 7, 7, 0]]))
    assert torch.equal(load_features(store, rows, False, "cpu"), torch.from_numpy(store.pooled[[7, 3, 7, 7, 0]]))


def test_feature_stats_match_numpy_over_distinct_images(cache):
    """Chunked (150 distinct images: two chunks) and computed once per image however often its rows repeat."""
    store, grid = cache
    rows = torch.tensor(list(range(0, 300, 2)) * 5)
    mean, std = feature_stats(store, rows, True)
    cells = grid[::2].astype(np.float64).reshape(-1, 6)
    assert np.allclose(mean, cells.mean(0)) and np.allclose(std, cells.std(0))
    mean, std = feature_stats(store, rows, False)
    assert np.allclose(mean, store.pooled[::2].astype(np.float64).mean(0))


def test_unfinished_cache_is_refused(cache):
    store, _ = cache
    (store.folder / "progress.json").write_text(json.dumps({"complete": False, "done": 10}))
    with pytest.raises(CaptioningError, match="not finished"):
        open_store(store.folder)


def test_cache_folder_is_keyed_by_encoder_and_images(tmp_path):
    a = cache_dir_for(tmp_path, EncoderSpec("resnet18"), ["a.jpg", "b.jpg"])
    assert a == cache_dir_for(tmp_path, EncoderSpec("resnet18"), ["a.jpg", "b.jpg"])
    assert a != cache_dir_for(tmp_path, EncoderSpec("resnet18"), ["b.jpg", "a.jpg"])
    assert a != cache_dir_for(tmp_path, EncoderSpec("mobilenet_v2"), ["a.jpg", "b.jpg"])
    assert a.parent == tmp_path / "cache" and a.name.startswith("resnet18-")


def test_mixed_store_reads_each_row_from_the_view_its_flag_names(tmp_path):
    """The --flip augmentation: a row flagged reads the mirror cache's row, the others the plain one,
    through the same readers training uses (repeated and unsorted rows included)."""
    from captioning.features.store import mixed_store
    rng = np.random.default_rng(0)
    plain = make_cache(tmp_path / "plain", rng.normal(size=(6, 4, 3)).astype(np.float16))
    mirror = make_cache(tmp_path / "mirror", rng.normal(size=(6, 4, 3)).astype(np.float16))
    flipped = np.array([True, False, True, False, False, True])
    mixed = mixed_store(plain, mirror, flipped)
    rows = torch.tensor([5, 0, 1, 5, 3])
    for grid, name in ((True, "grid"), (False, "pooled")):
        got = load_features(mixed, rows, grid, "cpu").numpy()
        for i, r in enumerate(rows.tolist()):
            want = getattr(mirror if flipped[r] else plain, name)[r]
            assert np.array_equal(got[i], want), (name, r)
    assert mixed.grid.shape == plain.grid.shape and plain.grid is not mixed.grid   # plain store untouched
