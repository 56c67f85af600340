"""The on-disk feature cache: where it lives, how it is read, how its rows are written.

One folder per (encoder, image list) pair under `<workdir>/cache/` (features.py fills it, resumably):
    images.json    the image paths, in row order
    grid.npy       fp16 [N, h*w, C]  spatial features (attention decoder)
    pooled.npy     fp16 [N, C]       their mean (Show-and-Tell decoder)
    progress.json  how many rows are finished, which images could not be read, whether it is complete
A finished cache is read memory-mapped: training touches the rows of each batch, never the whole file
(Flickr8k's grid is 1 GB, COCO's 4 GB).
"""
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from captioning.features.encoders import EncoderSpec
from captioning.utils import CaptioningError

CACHE_VERSION = 1


def cache_dir_for(workdir, spec: EncoderSpec, paths, mirror=False):
    """Same encoder and same images → same folder, so every command reuses one extraction."""
    key = [CACHE_VERSION, spec.to_dict(), [str(p) for p in paths]] + (["mirror"] if mirror else [])
    if spec.weights_path and os.path.exists(spec.weights_path):
        st = os.stat(spec.weights_path)   # a weights file replaced in place must not reuse old features
        key.append([st.st_size, st.st_mtime_ns])
    h = hashlib.sha1(json.dumps(key).encode()).hexdigest()
    return Path(workdir) / "cache" / f"{spec.name}{'-mirror' if mirror else ''}-{h[:12]}"


@dataclass
class FeatureStore:
    """A finished cache, memory-mapped: rows are read from disk on demand, not loaded whole."""
    folder: Path
    paths: list
    grid: np.ndarray
    pooled: np.ndarray
    bad: set
    grid_hw: tuple

    def row_of(self):
        return {p: i for i, p in enumerate(self.paths)}

    @property
    def grid_size(self):
        return self.grid.shape[1]

    @property
    def channels(self):
        return self.grid.shape[2]


def open_store(folder):
    folder = Path(folder)
    progress = json.loads((folder / "progress.json").read_text())
    if not progress.get("complete"):
        raise CaptioningError(f"The feature cache in {folder} is not finished; run extract again to resume it.")
    paths = json.loads((folder / "images.json").read_text())
    grid = np.load(folder / "grid.npy", mmap_mode="r")
    pooled = np.load(folder / "pooled.npy", mmap_mode="r")
    return FeatureStore(folder, paths, grid, pooled, set(progress.get("bad", [])), tuple(progress["grid_hw"]))


class RowWriter:
    """Writes rows of a preallocated .npy file in place with plain file writes. A writable memmap would
    keep every written page mapped into this process: 1 GB of RSS for Flickr8k's grid, 4 GB for COCO."""

    def __init__(self, path):
        self.file = open(path, "r+b")
        version = np.lib.format.read_magic(self.file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(self.file)
        self.offset = self.file.tell()
        self.dtype, self.row_bytes = dtype, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def write(self, row, array):
        self.file.seek(self.offset + row * self.row_bytes)
        self.file.write(np.ascontiguousarray(array, dtype=self.dtype).data)

    def flush(self):
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


class Mixed:
    """Rows of one array or of another, as `second[row]` says: the features of each photo or of its
    mirror image, drawn anew each epoch (a training augmentation). Reads like the memory-mapped array."""

    def __init__(self, first, second_array, second):
        self.first, self.second_array, self.second = first, second_array, second   # second: bool [N]

    @property
    def shape(self):
        return self.first.shape

    def __getitem__(self, rows):
        rows = np.asarray(rows)
        flip = self.second[rows]
        out = np.empty((len(rows),) + self.first.shape[1:], self.first.dtype)
        out[~flip] = self.first[rows[~flip]]
        out[flip] = self.second_array[rows[flip]]
        return out


def mixed_store(store, mirror, flipped):
    """`store` with each row where `flipped` is set read from `mirror` (the same images, mirrored)."""
    return replace(store, grid=Mixed(store.grid, mirror.grid, flipped),
                   pooled=Mixed(store.pooled, mirror.pooled, flipped))


# --- reading rows for training and search ---------------------------------------------------------

def load_unique(store, rows, grid, device):
    """Features of each distinct image in `rows` once, plus the index mapping rows to them.
    Reads from the memory-mapped cache in sorted order (sequential on disk)."""
    uniq, inverse = np.unique(rows.numpy(), return_inverse=True)
    array = np.ascontiguousarray((store.grid if grid else store.pooled)[uniq])
    return torch.from_numpy(array).to(device), torch.from_numpy(inverse.reshape(-1)).to(device)


def load_features(store, rows, grid, device):
    """Features for each of `rows` (repeated rows repeated)."""
    feats, index = load_unique(store, rows, grid, device)
    return feats[index]


def feature_stats(store, rows, grid):
    """Per-channel mean and std over the training images, computed in chunks to keep memory flat: 128
    images of a 7x7 grid in float64 are 64 MB, squared in place (bench/memory.py)."""
    total, sq, n = 0.0, 0.0, 0
    rows = np.unique(rows.numpy())
    for i in range(0, len(rows), 128):
        x = np.asarray((store.grid if grid else store.pooled)[rows[i:i + 128]], dtype=np.float64)
        x = x.reshape(-1, x.shape[-1])
        total, n = total + x.sum(0), n + len(x)
        sq = sq + np.square(x, out=x).sum(0)
    mean = total / n
    return mean, np.sqrt(np.maximum(sq / n - mean * mean, 1e-12))
