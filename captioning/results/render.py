"""Pictures for people: a photo with its caption (Pillow), attention maps per word, training curves.

matplotlib is imported inside the functions (it costs ~0.3 s) and only through its object API
(Figure + FigureCanvasAgg): no pyplot, so no global backend state and no figure registry that
leaks memory when hundreds of images are captioned. Every PNG is written atomically.
"""
import functools
import math
import struct
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from captioning.features.images import open_image
from captioning.utils import atomic_write

try:    # ISA-L's deflate: a zlib stream like zlib's own at level 1, about three times faster and no larger
    from isal.isal_zlib import compress as deflate
except ImportError:     # a platform without its wheels: the standard library's
    from zlib import compress as deflate

DPI = 100
CAPTION_FONT = 18      # points; readable when the PNG is shown at half size
TAGS_FONT = 12         # the keywords' line under the caption: smaller and grey, secondary to the caption
TINY = 96              # photos smaller than this (longest side, px) are upscaled with hard pixel edges


def _new_figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _quiet(fn):
    """Glyphs missing from the font (emoji, CJK without a CJK font) draw as boxes; matplotlib warns
    once per glyph, which is noise for the user, not a failure."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Gg]lyph.*missing.*")
            return fn(*args, **kwargs)
    return wrapper


def _save(fig, path):
    # format="png" explicitly: the temporary file's name ends in .tmp.
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI, facecolor="white"))
    fig.clear()
    return Path(path)


def _to_rgb(image):
    """Any PIL image (or a path to one) as RGB; transparency is flattened onto white, not black."""
    if not isinstance(image, Image.Image):
        with open_image(image) as im:
            image = ImageOps.exif_transpose(im)
            image.load()
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(image, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _fit(image, max_w, max_h):
    """Display size in inches that keeps the aspect ratio and fills max_w x max_h as far as possible."""
    w, h = image.size
    scale = min(max_w / w, max_h / h)
    return w * scale, h * scale


@functools.lru_cache(maxsize=4)
def _font(px):
    """matplotlib's DejaVu Sans (matplotlib is a requirement), found without importing matplotlib; where it is
    not installed (the ONNX runtime's requirements-onnx.txt) Pillow's own scalable font."""
    import importlib.util
    spec = importlib.util.find_spec("matplotlib")
    path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf" if spec else None
    try:
        return ImageFont.truetype(str(path), px)
    except (OSError, TypeError):
        return ImageFont.load_default(px)


def _wrap_px(text, font, width, prefix=""):
    """Greedy word wrap by measured width (proportional fonts: "WWW" is wider than "iii"); a word wider than a
    line is cut by characters. Later lines are indented under the first line's prefix ("1. ")."""
    indent = " " * (len(prefix) + 1) if prefix else ""
    lines, line = [], prefix
    for word in text.split():
        trial = f"{line} {word}" if line.strip() else line + word
        if font.getlength(trial) <= width:
            line = trial
            continue
        if line.strip():
            lines.append(line)
            line = indent + word
        while font.getlength(line) > width and len(line) > len(indent) + 1:
            cut = len(line) - 1
            while cut > len(indent) + 1 and font.getlength(line[:cut]) > width:
                cut -= 1
            lines.append(line[:cut])
            line = indent + line[cut:]
    return lines + [line] if line.strip() or not lines else lines


def tag_line(tags):
    """The keywords as the PNG shows them: "cat 0.93 · tabby 0.41" (tags as Result.tags, or plain words)."""
    return " · ".join(t if isinstance(t, str) else f"{t['word']} {t['score']:.2f}" for t in tags or [])


def save_captioned_image(image, caption, path, tags=None):
    """The photo with its caption (or numbered captions) below in large wrapped text and, given `tags`, a
    small grey line of them under it; returns the path.

    Drawn with Pillow: as the matplotlib figure it replaces (800 px wide, DejaVu Sans at 18 pt, the photo
    fitted above), several times faster, so a folder run is not limited by its pictures."""
    image = _to_rgb(image)
    captions = [caption] if isinstance(caption, str) else list(caption)
    captions = [" ".join(str(c).split()) for c in captions]  # newlines/tabs would break the layout
    if not any(captions):
        captions = ["(no caption)"]
    width, margin, gap, max_photo_h = int(8 * DPI), int(0.25 * DPI), int(0.2 * DPI), int(8 * DPI)
    font = _font(round(CAPTION_FONT * DPI / 72))
    several = len(captions) > 1
    lines = []
    for i, cap in enumerate(captions, 1):
        lines += _wrap_px(cap, font, width - 2 * margin, f"{i}. " if several else "")
    line_h = round(font.size * 1.35)
    small = _font(round(TAGS_FONT * DPI / 72))
    tag_lines = _wrap_px(tag_line(tags), small, width - 2 * margin) if tags else []
    tags_h = round(small.size * 1.35) * len(tag_lines) + (gap // 2 if tag_lines else 0)
    pw, ph = _fit(image, width - 2 * margin, max_photo_h)
    pw, ph = max(1, round(pw)), max(1, round(ph))
    # Tiny images are blown up a lot: nearest keeps the pixels crisp instead of a blur.
    photo = image.resize((pw, ph), Image.NEAREST if max(image.size) < TINY else Image.BICUBIC)
    canvas = Image.new("RGB", (width, margin + ph + gap + line_h * len(lines) + tags_h + margin), "white")
    canvas.paste(photo, ((width - pw) // 2, margin))
    draw = ImageDraw.Draw(canvas)
    y = margin + ph + gap
    for line in lines:
        x = margin if several else (width - font.getlength(line)) / 2
        draw.text((x, y), line, fill="black", font=font)
        y += line_h
    y += gap // 2 if tag_lines else 0
    for line in tag_lines:
        draw.text(((width - small.getlength(line)) / 2, y), line, fill=(110, 110, 110), font=small)
        y += round(small.size * 1.35)
    data = png_bytes(canvas)
    return atomic_write(path, lambda f: f.write(data))


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(image):
    """An RGB image as a PNG file's bytes (8-bit RGB, no metadata): every row "Up"-filtered (its difference
    from the row above, modulo 256), then deflated at level 1 (by ISA-L where `isal` is installed).

    Why not Pillow's encoder: it tries all five PNG filters on every row, which was half of its 30 ms on a
    captioned photo (800 x 854 px). One filter in numpy takes 1 ms and, on a photo over white, gives files as
    small (about 650 kB either way); the pixels are the same, losslessly."""
    rows = np.asarray(image.convert("RGB"), dtype=np.uint8)
    h, w, _ = rows.shape
    rows = rows.reshape(h, w * 3)
    filtered = np.empty((h, w * 3 + 1), np.uint8)
    filtered[:, 0] = 2                                    # the filter type byte: Up
    filtered[0, 1:] = rows[0]                             # above the first row is zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])   # uint8: wraps modulo 256, as PNG's filter does
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)    # 8 bits, truecolour, deflate, filtered, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", deflate(filtered.tobytes(), 1))
            + _chunk(b"IEND", b""))


def _as_maps(alphas, n_words):
    a = np.asarray(alphas, dtype=np.float32)
    if a.ndim == 2 and a.shape[0] == n_words and a.shape[1] > 0:
        # Decoders emit [T, h*w]; a square grid is the usual case (7x7, 14x14).
        side = math.isqrt(a.shape[1])
        if side * side != a.shape[1]:
            raise ValueError(f"alphas of shape {a.shape} is not a square grid; pass [T, h, w]")
        a = a.reshape(n_words, side, side)
    if a.ndim != 3 or a.shape[0] != n_words or (n_words and min(a.shape[1:]) < 1):
        raise ValueError(f"alphas must have shape [T, h, w] with T = {n_words} words, got {a.shape}")
    return np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)


def _upsample(alpha, size):
    """An h x w attention map as a smooth map of `size` (w, h) in [0, 1]: bicubic, then a gaussian blur
    about half a grid cell wide so the grid's square cells don't show."""
    alpha = alpha - alpha.min()
    peak = alpha.max()
    alpha = alpha / peak if peak > 0 else np.ones_like(alpha)  # uniform attention: everywhere equally
    big = Image.fromarray(alpha, "F").resize(size, Image.BICUBIC)
    big = Image.fromarray((np.clip(np.asarray(big), 0, 1) * 255).astype(np.uint8), "L")
    radius = 0.5 * max(size[0] / alpha.shape[1], size[1] / alpha.shape[0])
    big = big.filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(big, dtype=np.float32) / 255


@_quiet
def save_attention_map(image, words, alphas, path, cols=5):
    """The photo, then one panel per word with where the decoder looked (alphas [T, h, w]); returns the path."""
    words = [str(w) for w in words]
    maps = _as_maps(alphas, len(words))  # validate before touching the file system
    image = _to_rgb(image)
    # Work at panel resolution: upsampling maps to a 4000 px photo would be slow and invisible.
    panel = image.copy()
    panel.thumbnail((320, 320), Image.LANCZOS)
    if max(panel.size) < TINY:
        scale = math.ceil(TINY / max(panel.size))
        panel = panel.resize((panel.width * scale, panel.height * scale), Image.NEAREST)

    n = len(words) + 1
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    cell_w = 2.6
    pw, ph = _fit(panel, cell_w - 0.2, 2.6)
    cell_h = ph + 0.55                           # room for the word above each panel
    fig_w = cols * cell_w
    sentence = " ".join(words) if words else "(no words)"
    chars = max(20, int(fig_w * 72 / (14 * 0.55)))
    heading = textwrap.wrap(sentence, chars)[:3]
    title_h = 0.25 + 0.3 * len(heading)
    fig_h = rows * cell_h + title_h
    fig = _new_figure(fig_w, fig_h)
    fig.text(0.5, 1 - 0.15 / fig_h, "\n".join(heading), ha="center", va="top", fontsize=14, parse_math=False)

    photo = np.asarray(panel)
    for i in range(n):
        r, c = divmod(i, cols)
        left = c * cell_w + (cell_w - pw) / 2
        bottom = fig_h - title_h - (r + 1) * cell_h + 0.1
        ax = fig.add_axes([left / fig_w, bottom / fig_h, pw / fig_w, ph / fig_h])
        ax.imshow(photo, interpolation="nearest")
        ax.set_axis_off()
        if i == 0:
            ax.set_title("photo", fontsize=13, color="gray", parse_math=False)
            continue
        heat = _upsample(maps[i - 1], panel.size)
        ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
        ax.set_title(words[i - 1], fontsize=15, parse_math=False)
    return _save(fig, path)


def _series(history, key):
    xs, ys = [], []
    for i, entry in enumerate(history):
        value = entry.get(key)
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        xs.append(entry.get("epoch", i + 1))
        ys.append(float(value))
    return xs, ys


@_quiet
def save_training_curves(history, path):
    """Train/val loss per epoch and, when present, dev BLEU-4 and CIDEr-D; returns the path."""
    from matplotlib.ticker import MaxNLocator
    history = [dict(e) for e in (history or [])]
    metrics = [k for k in ("BLEU-4", "CIDEr-D") if _series(history, k)[0]]
    panels = 2 if metrics else 1
    fig = _new_figure(6.5 * panels, 4.5)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    best = [e.get("epoch", i + 1) for i, e in enumerate(history) if e.get("best")]
    epochs = [e.get("epoch", i + 1) for i, e in enumerate(history)]
    epochs = [x for x in epochs if isinstance(x, (int, float))]

    plots = [("loss", [("train_loss", "train"), ("val_loss", "validation")])]
    if metrics:
        plots.append(("dev score", [(k, k) for k in metrics]))
    for ax, (ylabel, keys) in zip(axes, plots):
        drawn = False
        for key, label in keys:
            xs, ys = _series(history, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=4, label=label)
                drawn = True
        for epoch in best[-1:]:  # the latest "best" is the checkpoint that was kept
            ax.axvline(epoch, color="gray", linestyle="--", linewidth=1, label="best")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if epochs and max(epochs) - min(epochs) < 2:
            # One or two epochs: give the axis room, or matplotlib ticks fractions of an epoch.
            ax.set_xlim(min(epochs) - 1, max(epochs) + 1)
        ax.grid(alpha=0.3)
        if drawn or best:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no training history yet", ha="center", va="center", transform=ax.transAxes,
                    color="gray", fontsize=13)
    axes[0].set_title("loss")
    if metrics:
        axes[1].set_title("validation metrics")
    fig.tight_layout()
    return _save(fig, path)
