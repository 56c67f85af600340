"""Captions where other programs read them: XMP sidecars, and the photo file's own metadata.

Written with ExifTool (Debian: libimage-exiftool-perl; macOS: brew install exiftool), not by this code
or Pillow: Pillow re-encodes a JPEG to change its metadata, piexif knows EXIF only and is unmaintained,
pyexiv2 bundles a C++ library whose wheels lag Python releases. ExifTool is the reference the photo
programs' own metadata is checked against; it rewrites the metadata segments and chunks only (JPEG scan
data, PNG IDAT, WebP bitstream byte-for-byte the same), keeps every other tag (camera fields,
orientation, ICC profile, GPS) and puts PNG text chunks before IDAT.

One exiftool process serves a whole run (-stay_open): starting perl costs ~0.2 s, a write to a running
one a few milliseconds. Its arguments arrive one per line, so a file name is a hostile input: a newline
in it would start a new argument (`-if` evaluates Perl), a name like `-o.jpg` would read as an option.
Names with control characters are refused, every path handed over is absolute (it starts with "/"), and
captions are flattened to one line. ExifTool's own -overwrite_original writes `<photo>_exiftool_tmp`, a
name anyone who can write to the folder can plant a symlink at; instead it writes the new copy (-o) into
a fresh private folder beside the photo (mkdtemp: mode 0700, a random name), which is renamed over the
photo with the photo's mode. A crash mid-write leaves the original; a killed run leaves at most an empty
hidden folder, removed by the next run in that folder.
"""
import os
import shutil
import stat
import subprocess
import tempfile
import time
import unicodedata
from pathlib import Path
from xml.sax.saxutils import escape

from captioning.utils import CaptioningError, atomic_write_text, temp_path_for

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
_euid = getattr(os, "geteuid", lambda: None)   # Windows has no user ids
TMP_PREFIX = ".captioning-exiftool-"   # the private folders a write goes through
STALE_S = 60                           # a write takes milliseconds: a private folder this old is a killed run's


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
        self.cleaned = set()   # the folders whose debris was looked for

    def run(self, args):
        """One exiftool command, arguments one per line; its output. Every argument must be one line."""
        if any(not one_line(a) for a in args):
            raise CaptioningError("an argument for exiftool holds a control character; refused.")
        # surrogateescape: a file name that is not UTF-8 reaches exiftool as the same bytes.
        self.proc.stdin.write(("\n".join([*args, "-execute"]) + "\n").encode("utf-8", "surrogateescape"))
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
        file has (KEYWORD_TAGS): none is removed, none is written twice. None or a one-line failure."""
        path = Path(path)
        tags = tags or TAGS.get(path.suffix.lower())
        if tags is None:
            return f"{path}: cannot write metadata into {path.suffix or 'this'} files without re-encoding; skipped"
        try:
            problem = refusal(path)
        except OSError as e:
            problem = f"cannot be read ({e.strerror})"
        if problem:
            return f"{path}: {problem}; metadata not written"
        self._clear_debris(path.absolute().parent)
        caption = "".join(c for c in " ".join(caption.split()) if c.isprintable())
        private = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=path.absolute().parent))
        try:
            new = private / path.name
            # -o FOLDER/: a new copy of the same name in the private folder (a file name given to -o would make
            # exiftool build that format from scratch: it cannot for WebP); -P keeps the modification time.
            # -o reads %d, %f, %e as format codes and a folder's name may hold them, so the folder is named
            # as %d (the photo's folder, as exiftool was given it) and mkdtemp's random name (no %).
            out = self.run(["-P", "-charset", "utf8", *(f"{t}={caption}" for t in tags),
                            *keyword_args(path.suffix.lower(), keywords), "-o", f"%d{private.name}/",
                            str(path.absolute())])
            if "1 image files created" not in out or not new.is_file():
                why = next((ln.split(":", 1)[-1].strip() for ln in out.splitlines() if ln.startswith("Error")),
                           out.strip())
                return f"{path}: metadata not written ({(why.splitlines() or ['unknown error'])[0]})"
            _replace_keeping_mode(new, path)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        return None

    def _clear_debris(self, folder):
        """Remove this user's private folders that a killed run left in `folder` (once per folder and run)."""
        if folder in self.cleaned:
            return
        self.cleaned.add(folder)
        try:
            entries = [e for e in os.scandir(folder) if e.name.startswith(TMP_PREFIX)]
            for e in entries:
                st = e.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) and st.st_uid == _euid() and time.time() - st.st_mtime > STALE_S:
                    shutil.rmtree(e.path, ignore_errors=True)   # never follows a symlink inside
        except OSError:
            pass   # debris is hidden and harmless; it must not cost the photo

    def close(self):
        try:
            self.proc.stdin.write(b"-stay_open\nFalse\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.proc.kill()


def one_line(text):
    """Whether `text` can travel as one line of exiftool's argument stream and be read back unchanged."""
    return text == text.strip() and not any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


def refusal(path):
    """Why a file is left as it is (a short reason), or None when its metadata may be rewritten."""
    if not one_line(str(path.absolute())):
        return "its name holds control characters (or begins or ends with a space), which are not passed to exiftool"
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link (neither it nor the file it points to is changed)"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_nlink > 1:
        return "it has other hard links, which would keep the old contents"
    # The owner's write bit as well as access(): root may write anything, but a photo made read-only stays so.
    if not st.st_mode & stat.S_IWUSR or not os.access(path, os.W_OK):
        return "read-only"
    return None


def _replace_keeping_mode(new, path):
    """Rename `new` over `path` with path's permissions (and, as root, its owner)."""
    st = os.stat(path)
    os.chmod(new, stat.S_IMODE(st.st_mode))
    if _euid() == 0:
        try:
            os.chown(new, st.st_uid, st.st_gid)
        except OSError:
            pass
    os.replace(new, path)


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
            if tag.startswith("XMP") or word.isascii():
                out += [f"-{tag}-={word}", f"-{tag}+={word}"]
    return out


def xmp_packet(caption, keywords=()):
    """A minimal XMP sidecar: dc:description and the IPTC alt text, as Lightroom and darktable read them, and
    the keywords as dc:subject."""
    c = escape("".join(ch for ch in " ".join(caption.split()) if ch.isprintable()))
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


def write_caption_txt(path, caption):
    """The caption and a newline at `path` (photo.txt), renamed into place; None or a one-line refusal. An
    existing file is replaced only when it looks like what this writes (one lowercase line, a plain file with
    one name, writable), and keeps its permissions: a person's notes.txt beside notes.jpg is left alone."""
    path, mode = Path(path), None
    try:
        st = os.lstat(path)
        problem = refusal(path)
        if problem is None and (st.st_size > 4096 or not _caption_like(path.read_bytes())):
            problem = "not a caption this tool wrote (one lowercase line)"
        if problem:
            return f"{path} exists and is left as it is: {problem}"
        mode = stat.S_IMODE(st.st_mode)
    except FileNotFoundError:
        pass
    if mode is None:
        atomic_write_text(path, caption + "\n")
        return None
    tmp = temp_path_for(path)
    try:
        tmp.write_text(caption + "\n", encoding="utf-8")
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return None


def _caption_like(data):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    line = text[:-1]
    return text.endswith("\n") and bool(line) and one_line(line) and line == line.lower()
