"""Feature extraction: right shapes and values, cache reuse, exact resume after a kill, bad images, settings."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from captioning.features import extract as features
from captioning.features.encoders import EncoderSpec, build_encoder
from captioning.config import ExtractConfig
from captioning.features.extract import extract_features, pick_device
from captioning.features.store import open_store
from captioning.data.synthetic import make_shapes_dataset
from captioning.utils import CaptioningError

SPEC = EncoderSpec("resnet18", weights=None)
CFG = ExtractConfig(batch_size=4, num_workers=0, device="cpu", channels_last=True)
N = 24


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """24 synthetic 224×224 shape JPEGs, made once for the module."""
    root = make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_images=N, seed=0)
    return sorted((root / "Images").glob("*.jpg"))


@pytest.fixture(scope="module")
def reference(paths, tmp_path_factory):
    """One plain, uninterrupted extraction that the other tests compare against."""
    return extract_features(paths, SPEC, tmp_path_factory.mktemp("reference"), CFG)


def assert_close_fp16(actual, expected):
    """Equal up to fp16 rounding (relative 2^-11) plus a little float32 reordering noise."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=2e-3, atol=1e-3 * scale)


class Recorder(nn.Module):
    """Wraps the trunk: records each batch size and can raise KeyboardInterrupt on the k-th image batch.

    The first call is extract_features' one-image shape probe; it is not counted as a batch."""

    def __init__(self, inner, interrupt_on_batch=None):
        super().__init__()
        self.inner, self.interrupt_on_batch = inner, interrupt_on_batch
        self.calls, self.batches = 0, []

    def forward(self, x):
        self.calls += 1
        if self.calls > 1:
            if len(self.batches) + 1 == self.interrupt_on_batch:
                raise KeyboardInterrupt
            self.batches.append(x.shape[0])
        return self.inner(x)


def record_trunk(monkeypatch, interrupt_on_batch=None):
    """Make extract_features build a Recorder around its trunk; returns a list that receives the recorder."""
    made = []

    def build(spec):
        trunk, transform = build_encoder(spec)
        made.append(Recorder(trunk, interrupt_on_batch))
        return made[-1], transform

    monkeypatch.setattr(features, "build_encoder", build)
    return made


def test_shapes_and_pooled_is_the_grid_mean(reference, paths):
    """Grid [N, 49, 512] and pooled [N, 512] in fp16; pooled is the mean over the 7×7 cells."""
    assert reference.grid.shape == (N, 49, 512) and reference.pooled.shape == (N, 512)
    assert reference.grid.dtype == np.float16 and reference.pooled.dtype == np.float16
    assert reference.grid_hw == (7, 7) and reference.paths == [str(p) for p in paths]
    assert reference.bad == set()
    assert_close_fp16(reference.pooled, np.asarray(reference.grid, np.float32).mean(axis=1))


def test_values_match_the_trunk_run_directly(reference, paths):
    """Row i holds the trunk's output for image i (right order, right preprocessing, no mix-up of axes)."""
    trunk, transform = build_encoder(SPEC)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        expected = trunk(x).flatten(2).transpose(1, 2).numpy()  # [N, 49, 512]
    assert np.abs(expected).max() > 0 and expected.std() > 0
    assert_close_fp16(reference.grid, expected)
    assert_close_fp16(reference.pooled, expected.mean(axis=1))


def test_cache_is_reused(reference, paths, monkeypatch):
    """A second call with the same encoder and images reads the cache: no encoder is even built."""
    def no_build(spec):
        raise AssertionError("the encoder was built although the cache is complete")

    monkeypatch.setattr(features, "build_encoder", no_build)
    store = extract_features(paths, SPEC, reference.folder.parents[1], CFG)
    assert store.folder == reference.folder
    assert np.array_equal(store.grid, reference.grid) and np.array_equal(store.pooled, reference.pooled)


def test_interrupted_extraction_resumes_to_the_same_cache(reference, paths, tmp_path, monkeypatch):
    """Killed after 2 batches, the next run does only the rest and ends with exactly the uninterrupted cache."""
    cfg = ExtractConfig(batch_size=4, num_workers=0, device="cpu", channels_last=True, flush_every_s=0)
    first = record_trunk(monkeypatch, interrupt_on_batch=3)
    with pytest.raises(KeyboardInterrupt):
        extract_features(paths, SPEC, tmp_path, cfg)
    assert first[0].batches == [4, 4]

    folder = next((tmp_path / "cache").iterdir())
    progress = json.loads((folder / "progress.json").read_text())
    assert progress["done"] == 8 and not progress["complete"]
    with pytest.raises(CaptioningError, match="not finished"):
        open_store(folder)

    second = record_trunk(monkeypatch)
    store = extract_features(paths, SPEC, tmp_path, cfg)
    assert sum(second[0].batches) == N - 8  # only the remaining images
    assert store.folder == folder and store.folder != reference.folder
    assert np.array_equal(store.grid, reference.grid)
    assert np.array_equal(store.pooled, reference.pooled)
    assert store.bad == set()


def test_unreadable_image_is_recorded_not_fatal(reference, paths, tmp_path):
    """A corrupt .jpg in the list is noted in store.bad; the other rows stay aligned with their images."""
    data = paths[3].read_bytes()
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(data[: len(data) // 2])
    mixed = [paths[0], corrupt, paths[1], paths[2], paths[3]]
    store = extract_features(mixed, SPEC, tmp_path / "work", CFG)
    assert store.bad == {str(corrupt)}
    assert store.grid.shape == (5, 49, 512)
    assert_close_fp16(store.grid[[0, 2, 3, 4]], reference.grid[:4])
    assert_close_fp16(store.pooled[[0, 2, 3, 4]], reference.pooled[:4])


def test_worker_processes_give_the_same_arrays(reference, paths, tmp_path):
    """Decoding in 2 DataLoader workers changes nothing: the arrays equal the in-process run's exactly."""
    store = extract_features(paths[:8], SPEC, tmp_path, ExtractConfig(batch_size=4, num_workers=2, device="cpu",
                                                                      channels_last=True))
    assert np.array_equal(store.grid, reference.grid[:8])  # same images in the same batches of 4
    assert np.array_equal(store.pooled, reference.pooled[:8])


def test_channels_last_does_not_change_features(reference, paths, tmp_path):
    """The CPU speed-up (channels_last) is only a memory layout: contiguous gives the same features."""
    store = extract_features(paths[:8], SPEC, tmp_path, ExtractConfig(batch_size=4, num_workers=0, device="cpu",
                                                                      channels_last=False))
    assert_close_fp16(store.grid, reference.grid[:8])
    assert_close_fp16(store.pooled, reference.pooled[:8])


def test_no_images_is_a_clear_error(tmp_path):
    """An empty image list says so instead of writing an empty cache."""
    with pytest.raises(CaptioningError, match="no images"):
        extract_features([], SPEC, tmp_path, CFG)


def test_cuda_requested_without_cuda(monkeypatch):
    """--device cuda on a machine without CUDA is a clear error; auto falls back to the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(CaptioningError, match="CUDA"):
        pick_device("cuda")
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")


def test_torchrun_slices_resume_and_merge_into_the_single_process_cache(reference, paths, tmp_path, monkeypatch):
    """Under torchrun each rank writes its own batch-aligned slice of the rows with its own progress marker
    (played here one rank after the other, in this process); an interrupted slice resumes on its own, and
    once every slice is done rank 0 marks the cache complete: exactly the single-process cache."""
    from captioning import distributed
    cfg = ExtractConfig(batch_size=4, num_workers=0, device="cpu", channels_last=True, flush_every_s=0)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "barrier", lambda: None)           # the other rank is "done" already
    monkeypatch.setattr(distributed, "check_same", lambda value, message: None)

    def as_rank(r, interrupt_on_batch=None):
        monkeypatch.setattr(distributed, "rank", lambda: r)
        return record_trunk(monkeypatch, interrupt_on_batch)

    first = as_rank(0, interrupt_on_batch=2)          # rank 0 allocates the files, then is interrupted
    with pytest.raises(KeyboardInterrupt):
        extract_features(paths, SPEC, tmp_path, cfg)
    assert first[0].batches == [4]
    folder = next((tmp_path / "cache").iterdir())
    assert json.loads((folder / "progress-0-12.json").read_text())["done"] == 4

    second = as_rank(1)                                # rank 1: rows 12-23, then waits for rank 0's merge
    with pytest.raises(CaptioningError, match="not finished"):
        extract_features(paths, SPEC, tmp_path, cfg)
    assert second[0].batches == [4, 4, 4]
    assert json.loads((folder / "progress-12-24.json").read_text())["complete"]

    third = as_rank(0)                                 # rank 0 resumes its slice and merges
    store = extract_features(paths, SPEC, tmp_path, cfg)
    assert third[0].batches == [4, 4]
    assert np.array_equal(store.grid, reference.grid) and np.array_equal(store.pooled, reference.pooled)
    assert (folder / "progress.json").read_bytes() == (reference.folder / "progress.json").read_bytes()
    assert not list(folder.glob("progress-*.json"))


def test_mirror_features_are_the_trunks_output_for_the_flipped_photos(reference, paths, tmp_path):
    """ExtractConfig(mirror=True) (what train --flip asks for) fills its own cache folder with the features
    of each photo mirrored left to right, and leaves the plain cache as it was."""
    from dataclasses import replace
    mirror = extract_features(paths, SPEC, reference.folder.parents[1], replace(CFG, mirror=True))
    assert mirror.folder != reference.folder and mirror.paths == reference.paths
    trunk, transform = build_encoder(SPEC)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[:6]])
    with torch.inference_mode():
        flipped = trunk(x.flip(-1)).flatten(2).transpose(1, 2).numpy()
        plain = trunk(x).flatten(2).transpose(1, 2).numpy()
    assert_close_fp16(mirror.grid[:6], flipped)
    assert np.abs(flipped - plain).max() > 0.1 * np.abs(plain).max()   # the photos are not symmetric
    assert_close_fp16(open_store(reference.folder).grid[:6], plain)
