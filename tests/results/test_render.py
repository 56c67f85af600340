import io
import zlib

import numpy as np
import pytest
from PIL import Image

from captioning.results import render
from captioning.results.render import png_bytes, save_attention_map, save_captioned_image, save_training_curves


def photo(w=64, h=48, mode="RGB"):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB").convert(mode)


def png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size, im.mode


def no_temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_captioned_image_is_png_with_text_area(tmp_path):
    out = save_captioned_image(photo(200, 100), "a dog runs on the grass", tmp_path / "c.png")
    assert out == tmp_path / "c.png"
    (w, h), mode = png(out)
    assert w >= 400 and mode in ("RGB", "RGBA")
    # The photo alone at this width would be w/2 tall; the caption needs room below it.
    assert h > w * 100 / 200 + 30
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "1", "I;16", "CMYK"])
def test_captioned_image_any_mode(tmp_path, mode):
    out = save_captioned_image(photo(mode=mode), "a picture", tmp_path / f"{mode}.png")
    (w, h), _ = png(out)
    assert w >= 400 and h >= 200


@pytest.mark.parametrize("size", [(1, 1), (16, 16), (3, 1), (1, 200)])
def test_captioned_image_tiny_and_extreme(tmp_path, size):
    im = Image.new("RGB", size, (200, 30, 30))
    (w, h), _ = png(save_captioned_image(im, "a red square", tmp_path / "t.png"))
    assert w >= 400 and h >= 100


def test_more_captions_and_long_text_make_a_taller_image(tmp_path):
    short = png(save_captioned_image(photo(), "short", tmp_path / "a.png"))[0][1]
    many = png(save_captioned_image(photo(), ["one", "two", "three"], tmp_path / "b.png"))[0][1]
    long = png(save_captioned_image(photo(), "word " * 120, tmp_path / "c.png"))[0][1]
    assert many > short and long > short


def test_captioned_image_unicode_and_math_characters(tmp_path):
    caps = ["un café à côté d'un vélo", "日本語のキャプション 🐶", "a $5 bill and $x^2$ {braces} \\alpha", ""]
    png(save_captioned_image(photo(), caps, tmp_path / "u.png"))
    png(save_captioned_image(photo(), "", tmp_path / "empty.png"))
    png(save_captioned_image(photo(), [], tmp_path / "none.png"))


def test_captioned_image_replaces_existing_file(tmp_path):
    path = tmp_path / "c.png"
    path.write_bytes(b"old")
    save_captioned_image(photo(), "new", path)
    png(path)
    assert no_temp_files(tmp_path)


def test_captioned_image_from_path_in_new_folder(tmp_path):
    src = tmp_path / "in.jpg"
    photo().save(src)
    out = save_captioned_image(str(src), "from a path", tmp_path / "sub" / "dir" / "c.png")
    png(out)


@pytest.mark.parametrize("deflater", ["installed", "zlib"])
@pytest.mark.parametrize("size", [(1, 1), (7, 3), (64, 48), (800, 854)])
def test_png_bytes_are_a_valid_png_of_the_same_pixels(size, deflater, monkeypatch):
    """Our own PNG writer: Pillow reads it back (checking every chunk's CRC) to exactly the same pixels,
    and it is about as small as Pillow's own encoding, with ISA-L's deflate and with zlib's (no isal)."""
    if deflater == "zlib":
        monkeypatch.setattr(render, "deflate", zlib.compress)
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    a[size[1] // 2:] = a[size[1] // 2:].mean(axis=(0, 1), dtype=np.float64).astype(np.uint8)   # flat half
    data = png_bytes(Image.fromarray(a, "RGB"))
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == size
        assert np.array_equal(np.asarray(im), a)
    theirs = io.BytesIO()
    Image.fromarray(a, "RGB").save(theirs, format="PNG", compress_level=1)
    assert len(data) < 1.2 * len(theirs.getvalue()) + 100


def test_captioned_image_pixels_are_as_pillow_draws_them(tmp_path, monkeypatch):
    """The layout is Pillow's drawing; only the file's encoder is ours, and it loses nothing."""
    drawn = []
    monkeypatch.setattr(render, "png_bytes", lambda canvas: drawn.append(canvas.copy()) or png_bytes(canvas))
    path = save_captioned_image(photo(120, 90), ["a dog", "a cat on a mat"], tmp_path / "x.png")
    with Image.open(path) as im:
        assert im.size[0] == 800 and np.array_equal(np.asarray(im), np.asarray(drawn[0]))


def test_attention_map(tmp_path):
    words = ["a", "dog", "runs", "on", "the", "grass", "<end>"]
    alphas = np.random.default_rng(1).random((len(words), 7, 7)).astype(np.float16)
    (w, h), _ = png(save_attention_map(photo(120, 80), words, alphas, tmp_path / "att.png"))
    assert w >= 5 * 200 and h >= 2 * 150  # 8 panels: two rows of five
    assert no_temp_files(tmp_path)


def test_attention_map_flat_grid_tiny_image_and_uniform_maps(tmp_path):
    alphas = np.full((2, 49), 1 / 49)  # [T, h*w] as decoders emit; uniform attention
    png(save_attention_map(Image.new("L", (1, 1)), ["a", "b"], alphas, tmp_path / "a.png"))
    nan = np.full((1, 3, 5), np.nan)
    png(save_attention_map(photo(mode="RGBA"), ["x$"], nan, tmp_path / "b.png"))


def test_attention_map_no_words(tmp_path):
    (w, h), _ = png(save_attention_map(photo(), [], np.zeros((0, 7, 7)), tmp_path / "a.png"))
    assert w >= 150 and h >= 150


def test_attention_map_bad_alphas_leave_old_file(tmp_path):
    path = tmp_path / "att.png"
    path.write_bytes(b"old")
    with pytest.raises(ValueError):
        save_attention_map(photo(), ["a", "b"], np.zeros((3, 7, 7)), path)
    with pytest.raises(ValueError):
        save_attention_map(photo(), ["a"], np.zeros((1, 50)), path)
    assert path.read_bytes() == b"old"
    assert no_temp_files(tmp_path)


def test_failure_while_rendering_leaves_old_file(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("captioning.utils.os.fsync", broken)   # the PNG half written when the disk fills
    path = tmp_path / "c.png"
    path.write_bytes(b"old")
    with pytest.raises(OSError):
        save_captioned_image(photo(), "x", path)
    assert path.read_bytes() == b"old"
    assert no_temp_files(tmp_path)


def history(n):
    return [{"epoch": i, "train_loss": 4 - 0.3 * i, "val_loss": 3.9 - 0.2 * i, "BLEU-4": 0.1 + 0.01 * i,
             "CIDEr-D": 0.3 + 0.02 * i, "lr": 4e-4, "best": i == n - 1} for i in range(1, n + 1)]


def test_training_curves(tmp_path):
    (w, h), _ = png(save_training_curves(history(10), tmp_path / "curves.png"))
    assert w >= 1000 and h >= 300  # two panels side by side
    assert no_temp_files(tmp_path)


def test_training_curves_single_epoch_and_missing_keys(tmp_path):
    png(save_training_curves(history(1), tmp_path / "one.png"))
    partial = [{"epoch": 1, "train_loss": 3.0}, {"epoch": 2, "train_loss": 2.5, "val_loss": None,
                                                   "BLEU-4": None, "CIDEr-D": float("nan")}]
    (w, h), _ = png(save_training_curves(partial, tmp_path / "partial.png"))
    assert w < 1000  # no metric present: only the loss panel
    png(save_training_curves([], tmp_path / "empty.png"))
    png(save_training_curves([{"epoch": 1}], tmp_path / "nothing.png"))
