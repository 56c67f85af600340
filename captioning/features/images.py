"""Reading photos and the encoders' preprocessing, with Pillow and numpy only (no torch).

Feature extraction and the torch captioner read photos with `load_image`; the ONNX runtime also
preprocesses with `resize_crop` and `normalise`, which reproduce torchvision's ImageClassification
transform on a PIL image step by step (short side resized with Pillow, center crop, /255, mean/std), as
features.Preprocess applies it: same pixels in, so the same features out.
"""
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, ImageSequence, UnidentifiedImageError

from captioning.utils import CaptioningError

# Photos larger than this many pixels are refused from their header, before any decoding: a 470 KB PNG
# can claim 121 Mpx (2.8 GB decoded). Pillow itself only warns up to twice its limit.
MAX_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)   # open_image refuses them itself
ImageFile.LOAD_TRUNCATED_IMAGES = False
# The decoders a photo may reach, whatever its name says (utils.IMAGE_SUFFIXES; JPEG includes the MPO
# files many phones write). Not EPS/PS (Ghostscript, wherever it is installed), nor Pillow's dozens of others.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")


def open_image(source):
    """Image.open limited to FORMATS, with the pixel limit checked from the header (nothing decoded yet).
    `source`: a path or a binary file. Raises Pillow's errors (UnidentifiedImageError, DecompressionBombError)."""
    img = Image.open(source, formats=FORMATS)
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise Image.DecompressionBombError(f"{w}x{h} pixels is more than the {MAX_PIXELS:,} allowed")
    return img

def load_image(path, draft_size=None):
    """Open any image a person may have: upright (EXIF), RGB, first frame of animations.

    `draft_size` lets the JPEG decoder skip detail we resize away anyway (2-4x faster on big photos)."""
    path = Path(path)
    try:  # the checks too: a folder without permission makes even exists() raise
        if not path.exists():
            raise CaptioningError(f"Image not found: {path}")
        if path.is_dir():
            raise CaptioningError(f"Expected an image file but got a folder: {path}")
        if path.stat().st_size == 0:
            raise CaptioningError(f"Image file is empty (0 bytes): {path}")
        with open_image(path) as img:
            if getattr(img, "is_animated", False):
                img = next(iter(ImageSequence.Iterator(img)))
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except PermissionError as e:  # `from e`: the one line for everyone, Pillow's own error for --debug
        raise CaptioningError(f"No permission to read image: {path}") from e
    except Image.DecompressionBombError as e:
        raise CaptioningError(f"Image is too large to decode safely ({e}): {path}") from e
    except UnidentifiedImageError as e:
        raise CaptioningError(f"Not an image file (or a format Pillow cannot read): {path}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise CaptioningError(f"Could not read image {path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from e


def to_rgb(img):
    """RGB with transparency flattened onto white; handles palette, 16-bit, CMYK and grayscale images."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Scale by the image's own range: 16-bit PNGs rarely use all 65535 levels.
        arr = np.asarray(img, dtype=np.float32)
        top = float(arr.max()) or 1.0
        img = Image.fromarray(np.clip(arr / top * 255, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def draft_size_for(transform):
    """The smallest decode size the transform can use without losing detail."""
    size = getattr(transform, "resize_size", None) or [256]
    return int(size[0]) if isinstance(size, (list, tuple)) else int(size)


# torchvision's InterpolationMode values → Pillow's filters (torchvision resizes PIL images with Pillow).
PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
               "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def resize_crop(img, resize, crop, interpolation="bilinear"):
    """torchvision's resize(short side → `resize`) then center_crop(`crop`) on a PIL image, as uint8 [H, W, 3]."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)      # torchvision's rounding: int(), not round()
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    if size != (w, h):
        img = img.resize(size, PIL_FILTERS[interpolation])
    w, h = img.size
    if crop > w or crop > h:                                       # torchvision pads with black, then crops
        canvas = Image.new("RGB", (max(w, crop), max(h, crop)))
        canvas.paste(img, ((crop - w) // 2 if crop > w else 0, (crop - h) // 2 if crop > h else 0))
        img, (w, h) = canvas, canvas.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def normalise(images, mean, std):
    """uint8 [B, H, W, 3] → float32 [B, 3, H, W]: /255 then per-channel (x - mean) / std, as torchvision."""
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)
    mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std
