"""The segmentation view's pieces, without streamlit: colours and legend, the overlay, a real DeepLabV3
(randomly initialised, so offline) end to end, and the one sentence when its weights cannot be fetched."""
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.features import segment
from captioning.utils import CaptioningError


def photo(w=60, h=40):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_labels_and_colours_are_pascal_voc():
    assert len(segment.LABELS) == 21
    assert segment.LABELS[0] == "background" and segment.LABELS[15] == "person" and segment.LABELS[12] == "dog"
    assert "dining table" in segment.LABELS and "tv monitor" in segment.LABELS
    assert tuple(segment.PALETTE[0]) == (0, 0, 0)
    assert tuple(segment.PALETTE[1]) == (128, 0, 0)       # aeroplane
    assert tuple(segment.PALETTE[15]) == (192, 128, 128)  # person
    assert len({tuple(c) for c in segment.PALETTE}) == 21  # every class its own colour


def test_overlay_tints_objects_and_leaves_the_background():
    image = photo()
    labels = np.zeros((40, 60), dtype=np.uint8)
    labels[5:20, 10:30] = 15    # a person
    labels[25:35, 40:55] = 12   # a dog
    out = np.asarray(segment.overlay(image, labels, alpha=0.5)).astype(int)
    src = np.asarray(image).astype(int)
    assert out.shape == src.shape
    assert (out[labels == 0] == src[labels == 0]).all()
    for cls in (15, 12):
        expected = np.round(0.5 * src[labels == cls] + 0.5 * segment.PALETTE[cls]).astype(int)
        assert np.abs(out[labels == cls] - expected).max() <= 1
    # Fully opaque: exactly the class colour.
    solid = np.asarray(segment.overlay(image, labels, alpha=1.0))
    assert (solid[labels == 15] == segment.PALETTE[15]).all()


def test_overlay_refuses_labels_that_do_not_fit():
    with pytest.raises(ValueError, match="do not match"):
        segment.overlay(photo(), np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="not one of"):
        segment.overlay(photo(), np.full((40, 60), 21, dtype=np.uint8))


def test_legend_lists_found_classes_largest_first_without_background():
    labels = np.zeros((10, 10), dtype=np.uint8)
    labels[:5, :] = 8      # cat: 50 pixels
    labels[5:7, :] = 15    # person: 20 pixels
    labels[9, 0] = 7       # car: 1 pixel
    entries = segment.legend(labels)
    assert [e.name for e in entries] == ["cat", "person", "car"]
    assert [e.share for e in entries] == pytest.approx([0.5, 0.2, 0.01])
    assert entries[1].colour == "#c08080"
    assert segment.legend(np.zeros((4, 4), dtype=np.uint8)) == []


def test_a_real_deeplab_with_random_weights_end_to_end():
    torch.manual_seed(0)
    segmenter = segment.load_segmenter(pretrained=False)
    assert sum(p.numel() for p in segmenter.model.parameters()) > 10_000_000   # the real architecture
    image = photo(130, 97)
    labels = segmenter.labels(image)
    assert labels.shape == (97, 130) and labels.dtype == np.uint8
    # The classes per pixel are the model's own argmax over its 21 classes: exactly so for an image
    # already at the model's working size (short side 520), where no resizing happens.
    square = photo(520, 520)
    with torch.inference_mode():
        scores = segmenter.model(segmenter.transform(square).unsqueeze(0))["out"]
    assert scores.shape == (1, 21, 520, 520)
    assert (segmenter.labels(square) == scores.argmax(1)[0].numpy()).all()
    drawn = segment.overlay(image, labels)
    assert drawn.size == image.size
    shares = sum(e.share for e in segment.legend(labels))
    assert shares == pytest.approx((labels > 0).mean())


def test_weights_that_cannot_be_downloaded_are_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))   # an empty cache: torchvision must download
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(CaptioningError) as err:
        segment.load_segmenter()
    message = str(err.value)
    assert calls, "the download was never tried"
    assert message.startswith("Segmentation is unavailable because its weights could not be downloaded")
    assert "\n" not in message and message.endswith(".") and ". " not in message   # one sentence
    assert "deeplabv3_mobilenet_v3_large" in message and str(tmp_path) in message
    assert "Errno" not in message


def test_a_damaged_cached_weights_file_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = segment.weights_file()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"half a download")
    with pytest.raises(CaptioningError, match="is damaged; delete it") as err:
        segment.load_segmenter()
    assert "\n" not in str(err.value) and str(cached) in str(err.value)
