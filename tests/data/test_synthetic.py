"""The synthetic shapes dataset: deterministic, loads as Mini COCO, and its captions tell the truth."""
import json
import time

import numpy as np
import pytest
from PIL import Image

from captioning.data.datasets import load_dataset
from captioning.data.synthetic import (COLOURS, POSITIONS, SHAPES, describe, make_shapes_dataset, shapes_truth,
                                  truth_for_image)
from captioning.data.vocab import tokenize


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The default dataset (600 images of 224×224), made once for the module; also times it."""
    root = tmp_path_factory.mktemp("shapes")
    start = time.perf_counter()
    make_shapes_dataset(root)
    return root, time.perf_counter() - start


def test_default_size_is_fast(shapes):
    root, seconds = shapes
    assert len(list((root / "Images").glob("*.jpg"))) == 600
    assert seconds < 10, f"600 images took {seconds:.1f} s"
    with Image.open(next((root / "Images").glob("*.jpg"))) as im:
        assert im.format == "JPEG" and im.size == (224, 224) and im.mode == "RGB"


def test_same_seed_same_bytes(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", n_images=40, size=64, seed=3)
    b = make_shapes_dataset(tmp_path / "b", n_images=40, size=64, seed=3)
    c = make_shapes_dataset(tmp_path / "c", n_images=40, size=64, seed=4)
    for name in ("captions.json", "truth.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    images_a = sorted(p.name for p in (a / "Images").iterdir())
    assert images_a == sorted(p.name for p in (b / "Images").iterdir())
    assert all((a / "Images" / n).read_bytes() == (b / "Images" / n).read_bytes() for n in images_a)
    assert not list(a.glob("**/*.tmp"))  # no temporary files left behind


def test_loads_as_mini_coco_with_held_out_images(shapes):
    root, _ = shapes
    d = load_dataset(root)
    assert d.layout == "mini-coco" and d.missing == 0 and len(d.records) == 600
    sizes = {s: len(d.split(s)) for s in ("train", "val", "test")}
    assert sizes["val"] > 0 and sizes["test"] > 0 and sizes["train"] > 450
    assert all(3 <= len(r.captions) <= 5 for r in d.records)


def test_small_dataset_still_has_val_and_test(tmp_path):
    d = load_dataset(make_shapes_dataset(tmp_path, n_images=12, size=64))
    assert d.split("val") and d.split("test")


def test_captions_match_the_truth(shapes):
    root, _ = shapes
    truth = shapes_truth(root)
    assert len(truth) == 600
    seen = set()
    for record in load_dataset(root).records:
        t = truth_for_image(truth, record.image)
        assert record.image.name == t["file"]
        seen.add((t["colour"], t["shape"], t["position"]))
        for caption in record.captions:
            words = set(tokenize(caption))
            assert {t["colour"], t["shape"], t["position"]} <= words, caption
            assert not (words & (set(COLOURS) | set(SHAPES) | set(POSITIONS))) - set(t.values()), caption
    assert len(seen) == len(COLOURS) * len(SHAPES) * len(POSITIONS)  # every combination is there


def test_captions_vary_like_real_mini_coco(shapes):
    root, _ = shapes
    captions = [c["caption"] for c in json.loads((root / "captions.json").read_text())]
    assert any(c[0].isupper() for c in captions) and any(c[0].islower() for c in captions)
    assert any(c.endswith(".") for c in captions) and any(c.endswith(" ") for c in captions)
    assert len({tuple(tokenize(c)) for c in captions}) > 48 * 3  # several phrasings, not one per combination


def test_images_show_the_truth(shapes):
    """The shape sits on the side the truth says, is big, and stays clear of the 6% border a center crop cuts."""
    root, _ = shapes
    truth = shapes_truth(root)
    for image_id in sorted(truth)[:60]:
        t = truth[image_id]
        with Image.open(root / "Images" / t["file"]) as im:
            a = np.asarray(im, dtype=np.int16)
        size = a.shape[0]
        background = np.median(a[:4, :4].reshape(-1, 3), axis=0)
        shape = np.abs(a - background).max(axis=2) > 60
        assert shape.mean() > 0.015, "shape too small"
        border = int(0.07 * size)
        inner = np.zeros_like(shape)
        inner[border:-border, border:-border] = True
        assert not (shape & ~inner).any(), "shape reaches the border"
        ys, xs = np.nonzero(shape)
        cx, cy = xs.mean() / size, ys.mean() / size
        expected = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6}[t["position"]]
        assert expected, (t, cx, cy)
        r, g, b = a[shape].mean(axis=0)
        colour = {"red": r > g + 60 and r > b + 60, "green": g > r + 40 and g > b + 40,
                  "blue": b > r + 60 and b > g + 60, "yellow": r > b + 100 and g > b + 100}[t["colour"]]
        assert colour, (t, r, g, b)


def test_describe_and_bad_arguments(tmp_path):
    assert describe({"colour": "red", "shape": "circle", "position": "left"}) == "a red circle on the left"
    assert describe({"colour": "blue", "shape": "square", "position": "top"}) == "a blue square at the top"
    from captioning.utils import CaptioningError
    with pytest.raises(CaptioningError):
        make_shapes_dataset(tmp_path, n_images=0)
    with pytest.raises(CaptioningError):
        shapes_truth(tmp_path / "nothing")
