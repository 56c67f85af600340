"""Captions where other programs read them: XMP sidecars, and the photo file's own metadata.

Written with ExifTool (Debian: libimage-exiftool-perl; macOS: brew install exiftool), not by this code
or Pillow: Pillow re-encodes a JPEG to change its metadata, piexif knows EXIF only and is unmaintained,
pyexiv2 bundles a C++ library whose wheels lag Python releases. ExifTool is the reference the photo
programs' own metadata is checked against; it rewrites the metadata segments and chunks only (JPEG scan
data, PNG IDAT, WebP bitstream byte-for-byte the same), keeps every other tag (camera fields,
orientation, ICC profile, GPS), puts PNG text chunks before IDAT, and replaces the file by renaming a
finished temporary copy (-overwrite_original), so a crash mid-write leaves the original.

One exiftool process serves a whole run (-stay_open): starting perl costs ~0.2 s, a write to a running
one a few milliseconds.
"""
import os
import shutil
import subprocess
from pathlib import Path
from xml.sax.saxutils import escape

from captioning.utils import CaptioningError, atomic_write_text

INSTALL = ("needs ExifTool: apt-get install libimage-exiftool-perl (Debian, Ubuntu), brew install exiftool "
           "(macOS), or see https://exiftool.org")
XMP_TAGS = ("-XMP-dc:Description", "-XMP-iptcCore:AltTextAccessibility")
# Per format, what a caption fills: photo managers and CMSs read dc:description (and EXIF ImageDescription,
# the older field), screen-reader pipelines the IPTC alt text, PNG viewers the Description text chunk.
TAGS = {".jpg": (*XMP_TAGS, "-EXIF:ImageDescription"), ".jpeg": (*XMP_TAGS, "-EXIF:ImageDescription"),
        ".tif": (*XMP_TAGS, "-EXIF:ImageDescription"), ".tiff": (*XMP_TAGS, "-EXIF:ImageDescription"),
        ".png": (*XMP_TAGS, "-PNG:Description"), ".webp": XMP_TAGS}
# Keywords (the tags) where photo libraries look for them: XMP dc:subject everywhere (Lightroom, darktable,
# digiKam), and the older IPTC Keywords too in the formats that carry an IPTC block.
KEYWORD_TAGS = {".jpg": ("XMP-dc:Subject", "IPTC:Keywords"), ".jpeg": ("XMP-dc:Subject", "IPTC:Keywords"),
                ".tif": ("XMP-dc:Subject", "IPTC:Keywords"), ".tiff": ("XMP-dc:Subject", "IPTC:Keywords"),
                ".png": ("XMP-dc:Subject",), ".webp": ("XMP-dc:Subject",), ".xmp": ("XMP-dc:Subject",)}
READY = b"{ready}"


def exiftool_path():
    return shutil.which("exiftool")


class ExifTool:
    """A running `exiftool -stay_open`; `write(path, caption)` returns None or a one-line failure."""

    def __init__(self):
        exe = exiftool_path()
        if exe is None:
            raise CaptioningError(f"--write-metadata {INSTALL}.")
        # stderr joins stdout: exiftool writes an error before the {ready} that ends its answer.
        self.proc = subprocess.Popen([exe, "-stay_open", "True", "-@", "-"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def run(self, args):
        """One exiftool command (arguments one per line: a caption never holds a newline); its output."""
        self.proc.stdin.write(("\n".join([*args, "-execute"]) + "\n").encode("utf-8"))
        self.proc.stdin.flush()
        out = b""
        while not out.rstrip().endswith(READY):
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                raise CaptioningError("exiftool stopped unexpectedly.")
            out += chunk
        return out.rstrip()[:-len(READY)].decode("utf-8", "replace")

    def write(self, path, caption, tags=None, keywords=()):
        """The caption into `tags` (default: TAGS for the file's format), and `keywords` added to the ones the
        file has (KEYWORD_TAGS): none is removed, none is written twice."""
        path = Path(path)
        tags = tags or TAGS.get(path.suffix.lower())
        if tags is None:
            return f"{path}: cannot write metadata into {path.suffix or 'this'} files without re-encoding; skipped"
        if not os.access(path, os.W_OK):   # a photo its owner made read-only is left as it is
            return f"{path}: read-only; metadata not written"
        caption = " ".join(caption.split())
        # -P keeps the file's modification time: photo managers sort and sync by it.
        out = self.run(["-overwrite_original", "-P", "-charset", "utf8", *(f"{t}={caption}" for t in tags),
                        *keyword_args(path.suffix.lower(), keywords), str(path)])
        if "1 image files updated" in out:
            return None
        why = next((ln.split(":", 1)[-1].strip() for ln in out.splitlines() if ln.startswith("Error")), out.strip())
        return f"{path}: metadata not written ({(why.splitlines() or ['unknown error'])[0]})"

    def close(self):
        try:
            self.proc.stdin.write(b"-stay_open\nFalse\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.proc.kill()


def clean_keywords(keywords):
    """Each keyword once, on one line of printable characters (exiftool reads its arguments a line each)."""
    words = ("".join(c for c in " ".join(str(k).split()) if c.isprintable()) for k in keywords)
    return [w for w in dict.fromkeys(words) if w]


def keyword_args(suffix, keywords):
    """ExifTool's idiom for adding list items without duplicates: each one removed, then added."""
    out = []
    for tag in KEYWORD_TAGS.get(suffix, ()):
        for word in clean_keywords(keywords):
            # IPTC holds Latin-1 unless the file declares UTF-8: its keywords stay ASCII, XMP has them all.
            if word and (tag.startswith("XMP") or word.isascii()):
                out += [f"-{tag}-={word}", f"-{tag}+={word}"]
    return out


def xmp_packet(caption, keywords=()):
    """A minimal XMP sidecar: dc:description and the IPTC alt text, as Lightroom and darktable read them, and
    the keywords as dc:subject."""
    c = escape(" ".join(caption.split()))
    alt = f'<rdf:Alt><rdf:li xml:lang="x-default">{c}</rdf:li></rdf:Alt>'
    words = clean_keywords(keywords)
    subject = "".join(f"<rdf:li>{escape(w)}</rdf:li>" for w in words)
    subject = f'   <dc:subject><rdf:Bag>{subject}</rdf:Bag></dc:subject>\n' if words else ""
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
            ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
            '  <rdf:Description rdf:about=""\n'
            '    xmlns:dc="http://purl.org/dc/elements/1.1/"\n'
            '    xmlns:Iptc4xmpCore="http://iptc.org/std/Iptc4xmpCore/1.0/xmlns/">\n'
            f'   <dc:description>{alt}</dc:description>\n'
            f'   <Iptc4xmpCore:AltTextAccessibility>{alt}</Iptc4xmpCore:AltTextAccessibility>\n'
            f'{subject}'
            '  </rdf:Description>\n'
            ' </rdf:RDF>\n'
            '</x:xmpmeta>\n'
            '<?xpacket end="w"?>\n')


def write_xmp_sidecar(path, caption, exiftool=None, keywords=()):
    """photo.xmp: a new packet, or, where one exists (a raw developer's settings), those two fields updated
    and the keywords added in it with ExifTool so that nothing else in it is lost. Returns None or a
    one-line failure."""
    path = Path(path)
    if not path.exists():
        atomic_write_text(path, xmp_packet(caption, keywords))
        return None
    if exiftool is None:
        return f"{path} exists and updating it without losing its other fields {INSTALL}; skipped"
    return exiftool.write(path, caption, XMP_TAGS, keywords)
