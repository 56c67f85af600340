"""Encoders by name, offline weight handling, and load_image on every kind of file a person may have."""
import io
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from captioning.features.encoders import EncoderSpec, build_encoder, concrete_spec, resolve_weights
from captioning.features.images import load_image
from captioning.utils import CaptioningError
from tests.helpers import TORCH_HOME

@pytest.fixture
def torch_home(monkeypatch):
    """Point torch's cache (TORCH_HOME) at a folder; refuse any real download while a test runs."""
    def point_at(folder):
        monkeypatch.setenv("TORCH_HOME", str(folder))
        monkeypatch.setattr(torch.hub, "_hub_dir", None)  # an earlier torch.hub.set_dir would override TORCH_HOME
        return folder

    def no_network(url, *args, **kwargs):
        raise AssertionError(f"a test tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return point_at


def state_of(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- building encoders ---------------------------------------------------------------------------------------

def test_resnet18_random_init_is_a_frozen_trunk_with_a_7x7_grid():
    """resnet18 without weights: eval mode everywhere, no trainable parameter, [B, 512, 7, 7] on 224 input."""
    trunk, transform = build_encoder(EncoderSpec("resnet18", weights=None))
    assert not trunk.training and not any(m.training for m in trunk.modules())
    assert all(not p.requires_grad for p in trunk.parameters())
    assert list(transform.crop_size) == [224]
    with torch.inference_mode():
        out = trunk(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 512, 7, 7)


def test_random_init_is_reproducible_from_the_seed():
    """The same spec twice gives identical weights (train and caption time must agree); another seed differs."""
    a = state_of(build_encoder(EncoderSpec("resnet18", weights=None, seed=0))[0])
    b = state_of(build_encoder(EncoderSpec("resnet18", weights=None, seed=0))[0])
    c = state_of(build_encoder(EncoderSpec("resnet18", weights=None, seed=1))[0])
    assert same_weights(a, b)
    assert not same_weights(a, c)


def test_building_does_not_disturb_the_global_rng():
    """Seeding the encoder happens in a forked RNG: the caller's random stream is unchanged."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_encoder(EncoderSpec("resnet18", weights=None, seed=7))
    assert torch.equal(torch.rand(3), expected)


def test_mobilenet_v2_random_init_has_1280_channels():
    """mobilenet_v2's trunk is its `features` block: 1280 channels on a 7x7 grid."""
    trunk, _ = build_encoder(EncoderSpec("mobilenet_v2", weights=None))
    with torch.inference_mode():
        out = trunk(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1280, 7, 7)


@pytest.mark.parametrize("weights", [None, "DEFAULT"])
def test_unknown_encoder_name_lists_known_names(weights):
    """A typo in --encoder gives one clear error naming encoders that do exist."""
    with pytest.raises(CaptioningError, match="resnet50") as err:
        build_encoder(EncoderSpec("resnet_eighteen", weights=weights))
    assert "resnet_eighteen" in str(err.value) and "mobilenet_v2" in str(err.value)


def test_failed_download_explains_how_to_work_offline(tmp_path, torch_home, monkeypatch):
    """No internet and no cached file: the error says where to put weights (TORCH_HOME) or --encoder-weights."""
    torch_home(tmp_path / "empty_torch_home")
    calls = []

    def offline(url, dst, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CaptioningError) as err:
        build_encoder(EncoderSpec("resnet18"))
    assert calls, "the download was never attempted"
    message = str(err.value)
    assert "TORCH_HOME" in message and "--encoder-weights" in message and "resnet18" in message


def test_encoder_weights_file_is_loaded(tmp_path):
    """--encoder-weights PATH: a state dict saved with torch.save(model.state_dict()) is what the trunk uses."""
    import torchvision
    torch.manual_seed(42)
    model = torchvision.models.resnet18()
    path = tmp_path / "my_resnet18.pt"
    torch.save(model.state_dict(), path)

    trunk, _ = build_encoder(EncoderSpec("resnet18", weights_path=str(path)))
    saved = model.state_dict()
    loaded = trunk.state_dict()  # the trunk's keys are the model's, numbered by position in the Sequential
    assert torch.equal(loaded["0.weight"], saved["conv1.weight"])
    assert torch.equal(loaded["4.0.conv1.weight"], saved["layer1.0.conv1.weight"])
    seeded = build_encoder(EncoderSpec("resnet18", weights=None))[0].state_dict()
    assert not torch.equal(loaded["0.weight"], seeded["0.weight"])


def test_missing_encoder_weights_file_is_a_clear_error(tmp_path):
    """A wrong --encoder-weights path names the path, with no traceback from torch.load."""
    missing = tmp_path / "nope.pt"
    with pytest.raises(CaptioningError, match="not found") as err:
        build_encoder(EncoderSpec("resnet18", weights_path=str(missing)))
    assert str(missing) in str(err.value)


def test_encoder_weights_file_of_another_model_is_a_clear_error(tmp_path):
    """Weights for a different architecture are refused with CaptioningError, not a RuntimeError dump."""
    import torchvision
    path = tmp_path / "mobilenet.pt"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    with pytest.raises(CaptioningError, match="Could not load encoder weights") as err:
        build_encoder(EncoderSpec("resnet18", weights_path=str(path)))
    assert isinstance(err.value.__cause__, RuntimeError)    # load_state_dict's own error, kept for --debug


def test_concrete_spec_prefers_a_cached_weights_file(tmp_path, torch_home):
    """DEFAULT is pinned to a tag; offline, a cached older file wins over an uncached DEFAULT."""
    checkpoints = torch_home(tmp_path / "th") / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    default = resolve_weights("mobilenet_v2", "DEFAULT")
    assert default.name == "IMAGENET1K_V2"

    # Nothing cached: DEFAULT resolves to the recommended tag.
    assert concrete_spec(EncoderSpec("mobilenet_v2")).weights == "IMAGENET1K_V2"

    # Only V1's file is cached (an empty file with the right name is enough for the choice).
    v1 = resolve_weights("mobilenet_v2", "IMAGENET1K_V1")
    (checkpoints / v1.url.rsplit("/", 1)[-1]).touch()
    spec = concrete_spec(EncoderSpec("mobilenet_v2", seed=3))
    assert (spec.name, spec.weights, spec.seed) == ("mobilenet_v2", "IMAGENET1K_V1", 3)

    # DEFAULT cached too: the recommended one is kept.
    (checkpoints / default.url.rsplit("/", 1)[-1]).touch()
    assert concrete_spec(EncoderSpec("mobilenet_v2")).weights == "IMAGENET1K_V2"

    # Explicit choices are left alone.
    assert concrete_spec(EncoderSpec("mobilenet_v2", weights=None)).weights is None
    assert concrete_spec(EncoderSpec("mobilenet_v2", weights_path="w.pt")).weights == "DEFAULT"


@pytest.mark.skipif(not TORCH_HOME.exists(), reason="no shared torch_home with real ImageNet weights")
def test_real_mobilenet_v2_weights_load_offline(torch_home):
    """With the shared TORCH_HOME, DEFAULT mobilenet_v2 builds from the cached ImageNet file, no network."""
    torch_home(TORCH_HOME)
    assert concrete_spec(EncoderSpec("mobilenet_v2")).weights == "IMAGENET1K_V1"
    trunk, _ = build_encoder(EncoderSpec("mobilenet_v2"))
    state = torch.load(TORCH_HOME / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth", weights_only=True)
    first_conv = trunk.state_dict()["0.0.weight"]
    assert torch.equal(first_conv, state["features.0.0.weight"])
    with torch.inference_mode():
        out = trunk(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1280, 7, 7) and torch.isfinite(out).all()


# --- load_image: unusual but valid images ----------------------------------------------------------------------

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def close(pixel, expected, tol=40):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def loaded(path, **kw):
    img = load_image(path, **kw)
    assert img.mode == "RGB"
    return img


def test_grayscale(tmp_path):
    """An 'L' image becomes grey RGB."""
    path = tmp_path / "grey.png"
    Image.new("L", (8, 8), 128).save(path)
    assert loaded(path).getpixel((3, 3)) == (128, 128, 128)


def test_rgba_png_transparent_becomes_white(tmp_path):
    """Transparent pixels are flattened onto white (not black), opaque ones keep their colour."""
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    img.paste((0, 0, 255, 255), (0, 0, 4, 8))
    path = tmp_path / "rgba.png"
    img.save(path)
    out = loaded(path)
    assert out.getpixel((1, 1)) == BLUE and out.getpixel((6, 1)) == WHITE


def test_la_image(tmp_path):
    """Grayscale with alpha: transparent → white, opaque black stays black."""
    img = Image.new("LA", (8, 8), (0, 0))
    img.paste((0, 255), (0, 0, 4, 8))
    path = tmp_path / "la.png"
    img.save(path)
    out = loaded(path)
    assert out.getpixel((1, 1)) == (0, 0, 0) and out.getpixel((6, 1)) == WHITE


def test_palette_png_with_transparency(tmp_path):
    """A palette PNG whose index 0 is transparent: those pixels are white, index 1 is red."""
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    img.paste(1, (0, 0, 4, 8))
    path = tmp_path / "palette.png"
    img.save(path, transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = loaded(path)
    assert out.getpixel((1, 1)) == RED and out.getpixel((6, 1)) == WHITE


@pytest.mark.parametrize("draft_size", [None, 256])
def test_cmyk_jpeg(tmp_path, draft_size):
    """A CMYK JPEG (print workflows) comes out RGB with the right colour."""
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path, quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    assert close(loaded(path, draft_size=draft_size).getpixel((16, 16)), RED)


def test_16_bit_png(tmp_path):
    """A 16-bit grayscale PNG (mode I;16) keeps its contrast instead of clipping everything to white."""
    arr = np.full((8, 16), 1000, dtype=np.uint16)
    arr[:, 8:] = 30000
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    with Image.open(path) as check:
        assert check.mode == "I;16"
    out = loaded(path)
    dark, bright = out.getpixel((2, 2)), out.getpixel((12, 2))
    assert dark[0] == dark[1] == dark[2] and bright == WHITE
    assert dark[0] < 64


def test_animated_gif_uses_first_frame(tmp_path):
    """An animated GIF is captioned from its first frame."""
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as check:
        assert check.is_animated and check.n_frames == 2
    assert close(loaded(path).getpixel((4, 4)), RED, tol=10)


def test_webp(tmp_path):
    """WebP photos load."""
    path = tmp_path / "photo.webp"
    Image.new("RGB", (16, 12), (0, 160, 0)).save(path, lossless=True)
    out = loaded(path)
    assert out.size == (16, 12) and out.getpixel((5, 5)) == (0, 160, 0)


def test_one_pixel_image_loads_and_transforms(tmp_path):
    """A 1×1 image loads and still goes through the encoder's transform to a full-size crop."""
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    out = loaded(path)
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (10, 20, 30)
    transform = resolve_weights("resnet18", "DEFAULT").transforms()
    assert transform(out).shape == (3, 224, 224)


@pytest.mark.parametrize("draft_size", [None, 256])
def test_exif_rotated_jpeg_comes_out_upright(tmp_path, draft_size):
    """EXIF orientation 6 (camera held sideways): the stored top-left marker shows at the top-right."""
    width, height = 1024, 768
    img = Image.new("RGB", (width, height), WHITE)
    img.paste(RED, (0, 0, 128, 128))  # a marker in the stored image's top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    path = tmp_path / "sideways.jpg"
    img.save(path, exif=exif, quality=95)

    out = loaded(path, draft_size=draft_size)
    w, h = out.size
    assert w * width == h * height and h > w  # portrait now: width and height swapped (maybe scaled by draft)
    if draft_size:
        assert min(w, h) >= draft_size  # the draft never decodes below the size asked for
    margin = w // 32
    assert close(out.getpixel((w - 1 - margin, margin)), RED)  # top-right
    assert close(out.getpixel((margin, margin)), WHITE)        # top-left
    assert close(out.getpixel((w - 1 - margin, h - 1 - margin)), WHITE)


# --- load_image: files that must be refused, clearly -----------------------------------------------------------

def real_jpeg_bytes():
    """A 128×128 noise JPEG: big enough that half of it cuts into the scan data."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def refused(path, match, cause=None, **kw):
    """load_image refuses `path` in one sentence; `cause`: the type of Pillow's own error, kept for --debug."""
    with pytest.raises(CaptioningError, match=match) as err:
        load_image(path, **kw)
    assert str(path) in str(err.value)
    if cause is not None:
        assert isinstance(err.value.__cause__, cause), repr(err.value.__cause__)
    return str(err.value)


def test_text_file_named_jpg(tmp_path):
    """A text file with an image extension is 'not an image', not a Pillow traceback."""
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photo\n")
    refused(path, "Not an image", cause=UnidentifiedImageError)


def test_empty_file(tmp_path):
    """A 0-byte file (e.g. a failed copy) says it is empty."""
    path = tmp_path / "empty.jpg"
    path.touch()
    refused(path, "empty")


@pytest.mark.parametrize("draft_size", [None, 256])
def test_truncated_jpeg(tmp_path, draft_size):
    """The first half of a real JPEG is refused (truncated images are never silently grey-filled)."""
    data = real_jpeg_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    refused(path, "(?i)could not read image.*truncated", cause=OSError, draft_size=draft_size)


def test_decompression_bomb(tmp_path, monkeypatch):
    """An image over Pillow's pixel limit is refused as too large."""
    path = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64), WHITE).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 pixels > 2 × 100: Pillow's hard limit
    refused(path, "too large", cause=Image.DecompressionBombError)


def test_directory(tmp_path):
    """A folder where a file was expected."""
    folder = tmp_path / "photos.jpg"
    folder.mkdir()
    refused(folder, "folder")


def test_missing_path(tmp_path):
    """A path that does not exist."""
    refused(tmp_path / "nowhere.jpg", "not found")
