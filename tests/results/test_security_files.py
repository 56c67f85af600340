"""Issue 23, the files side: what a hostile folder can do to a run that captions it. File names that would
run code through ExifTool's argument stream, a planted symlink at ExifTool's temporary name, decompression
bombs and formats the tool does not support, formula cells, someone else's CSV/JSONL/.txt, colliding PNG
names, terminal escapes, read-only and linked photos. Each test fails on the code before the fix."""
import csv
import os
import stat
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile


from captioning.features.images import load_image
from captioning.results.metadata import TMP_PREFIX, ExifTool, exiftool_path, write_xmp_sidecar
from captioning.results.outputs import OutputConfig, Outputs, Photo, Result, RowFile, key, warn, write_txt_sidecar
from captioning.utils import CaptioningError, printable

needs_exiftool = pytest.mark.skipif(exiftool_path() is None, reason="exiftool not installed "
                                    "(apt-get install libimage-exiftool-perl)")
# A newline starts a new exiftool argument: -if evaluates Perl for every file that follows (y.jpg).
EVIL = "x\n-if\nsystem(q{touch PWNED}) || 1\ny"


def jpeg(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path, "JPEG")
    return path


def description(path):
    return subprocess.run([exiftool_path(), "-s3", "-XMP-dc:Description", "--", str(path)], capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.fixture
def tool():
    t = ExifTool()
    yield t
    t.close()


@needs_exiftool
def test_a_file_name_cannot_run_code_through_exiftool(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # exiftool's working folder: where `touch PWNED` would land
    evil, evil_xmp = jpeg(tmp_path / f"{EVIL}.jpg"), tmp_path / f"{EVIL}.xmp"
    jpeg(tmp_path / "y.jpg")
    (tmp_path / "y.xmp").write_text("<x:xmpmeta xmlns:x='adobe:ns:meta/'/>")
    evil_xmp.write_text("<x:xmpmeta xmlns:x='adobe:ns:meta/'/>")   # --xmp updates an existing sidecar with exiftool
    before = evil.read_bytes()
    t = ExifTool()
    try:
        out = Outputs(OutputConfig(png=False, metadata=True, xmp=True), single=False)
        out.submit(Photo(evil, Path(evil.name)), Result(str(evil), ["a dog"], [-1.0]))
        out.close()
        direct = [t.write(evil, "a dog"), write_xmp_sidecar(evil_xmp, "a dog", t)]
    finally:
        t.close()
    assert not (tmp_path / "PWNED").exists()
    assert evil.read_bytes() == before
    assert len(out.failures) == 2 and all("control characters" in m for m in out.failures + direct)


@needs_exiftool
def test_a_name_like_an_option_is_a_file(tmp_path, monkeypatch, tool):
    monkeypatch.chdir(tmp_path)
    jpeg(tmp_path / "-o.jpg")
    assert tool.write(Path("-o.jpg"), "a dog on a beach") is None   # relative, as a user may name it
    assert description(tmp_path / "-o.jpg") == "a dog on a beach"


@needs_exiftool
def test_a_symlink_at_exiftools_temporary_name_writes_nothing_there(tmp_path, tool):
    photo = jpeg(tmp_path / "p.jpg")
    os.chmod(photo, 0o640)
    os.utime(photo, (1e9, 1e9))
    (tmp_path / "p.jpg_exiftool_tmp").symlink_to(tmp_path / "planted")
    assert tool.write(photo, "a cat") is None
    st = os.lstat(photo)
    assert not (tmp_path / "planted").exists()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime == 1e9
    assert description(photo) == "a cat"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)] == []


@needs_exiftool
def test_a_folder_name_with_format_codes_is_only_a_name(tmp_path, tool):
    folder = tmp_path / "50%d%f"   # exiftool's -o would expand %d (the source's folder) and %f
    photo = jpeg(folder.mkdir() or folder / "p.jpg")
    assert tool.write(photo, "a cat") is None and description(photo) == "a cat"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["50%d%f", "p.jpg"]


@needs_exiftool
def test_a_killed_runs_debris_is_cleared_and_a_killed_exiftool_leaves_none(tmp_path, tool):
    photo = jpeg(tmp_path / "p.jpg")
    debris = tmp_path / f"{TMP_PREFIX}abc123"
    debris.mkdir()
    (debris / "p.jpg").write_bytes(b"half")
    os.utime(debris, (time.time() - 3600, time.time() - 3600))
    assert tool.write(photo, "a cat") is None and not debris.exists()
    before = photo.read_bytes()
    tool.proc.kill()
    tool.proc.wait()
    with pytest.raises((CaptioningError, OSError)):
        tool.write(photo, "a dog")
    assert photo.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)] == []


@needs_exiftool
def test_read_only_and_linked_photos_are_left_alone_even_as_root(tmp_path, monkeypatch, tool):
    ro, target, hard = jpeg(tmp_path / "ro.jpg"), jpeg(tmp_path / "target.jpg"), jpeg(tmp_path / "hard.jpg")
    os.chmod(ro, 0o444)
    (tmp_path / "link.jpg").symlink_to(target)
    os.link(hard, tmp_path / "hard2.jpg")
    monkeypatch.setattr(os, "access", lambda *a, **k: True)   # as root: every file is writable
    before = {p: p.read_bytes() for p in (ro, target, hard)}
    messages = [tool.write(p, "a cat") for p in (ro, tmp_path / "link.jpg", hard)]
    assert {p: p.read_bytes() for p in before} == before
    assert "read-only" in messages[0] and "symbolic link" in messages[1] and "hard links" in messages[2]
    assert all("\n" not in m for m in messages) and (tmp_path / "link.jpg").is_symlink()


def png_header_bomb(path, side):
    """A valid grayscale PNG of side x side zero pixels: small on disk, side**2 bytes once decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z, row, rows = zlib.compressobj(9), b"\0" * (side + 1), []
    rows = [z.compress(row) for _ in range(side)] + [z.flush()]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(rows)) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = png_header_bomb(tmp_path / "bomb.png", 9000)   # 81 Mpx: above the limit, below Pillow's own error
    assert bomb.stat().st_size < 200_000
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or 1 / 0)
    with pytest.raises(CaptioningError, match="too large to decode safely") as err:
        load_image(bomb)
    assert decoded == [] and "\n" not in str(err.value)


def test_an_eps_inside_a_jpg_never_reaches_ghostscript(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or 1 / 0)
    eps = tmp_path / "photo.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n")
    with pytest.raises(CaptioningError, match="Not an image file"):
        load_image(eps)
    from captioning.results.render import save_captioned_image
    with pytest.raises(Exception):
        save_captioned_image(eps, ["a dog"], tmp_path / "out.png")
    assert calls == [] and not (tmp_path / "out.png").exists()


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tmp_path):
    path = tmp_path / "out.csv"
    rows = RowFile(path, "csv")
    rows.write(Result("=HYPERLINK(1).jpg", ["-2+3", "@SUM(A1)", "+x", "a dog"], [-1.5, -2.0, -3.0, -4.0]))
    rows.close()
    with open(path, newline="") as f:
        cells = list(csv.reader(f))[1:]
    assert [r[0] for r in cells] == ["'=HYPERLINK(1).jpg"] * 4
    assert [r[1] for r in cells] == ["'-2+3", "'@SUM(A1)", "'+x", "a dog"]
    assert [r[2] for r in cells] == ["-1.5000", "-2.0000", "-3.0000", "-4.0000"]   # numbers stay numbers
    assert RowFile(path, "csv").done == {key("=HYPERLINK(1).jpg")}                 # resuming reads them back


@pytest.mark.parametrize("kind,text", [("csv", "month,amount\njan,3"), ("jsonl", "my notes\nsecond line"),
                                       ("jsonl", '{"image": "a.jpg"}\nnot json\n'), ("csv", "no newline at all")])
def test_a_csv_or_jsonl_that_is_not_ours_is_refused_before_anything_changes(tmp_path, kind, text):
    path = tmp_path / f"file.{kind}"
    path.write_text(text)
    with pytest.raises(CaptioningError, match="choose another"):
        RowFile(path, kind)
    assert path.read_text() == text


def test_txt_never_replaces_a_file_it_did_not_write_and_keeps_the_mode(tmp_path):
    notes, ours, linked = (jpeg(tmp_path / f"{n}.jpg") for n in ("notes", "ours", "linked"))
    (tmp_path / "notes.txt").write_text("My notes\nabout this photo\n")
    (tmp_path / "ours.txt").write_text("a dog\n")
    os.chmod(tmp_path / "ours.txt", 0o600)
    (tmp_path / "elsewhere.txt").write_text("a dog\n")
    (tmp_path / "linked.txt").symlink_to(tmp_path / "elsewhere.txt")
    assert "left as it is" in write_txt_sidecar(notes, "a cat")
    assert write_txt_sidecar(ours, "a cat") is None
    assert "left as it is" in write_txt_sidecar(linked, "a cat")
    assert (tmp_path / "notes.txt").read_text() == "My notes\nabout this photo\n"
    assert (tmp_path / "ours.txt").read_text() == "a cat\n"
    assert stat.S_IMODE(os.stat(tmp_path / "ours.txt").st_mode) == 0o600
    assert (tmp_path / "elsewhere.txt").read_text() == "a dog\n" and (tmp_path / "linked.txt").is_symlink()


def test_png_names_never_collide(tmp_path):
    photos = [Photo(tmp_path / "a.jpg", Path("a.jpg")), Photo(tmp_path / "a.png", Path("a.png")),
              Photo(tmp_path / "A.JPG", Path("A.JPG")),
              Photo(tmp_path / "a" / "x.jpg", Path("x.jpg")), Photo(tmp_path / "b" / "x.jpg", Path("x.jpg")),
              Photo(tmp_path / "a_png.jpg", Path("a_png.jpg"))]
    out = Outputs(OutputConfig(png=False, output=str(tmp_path / "pngs")), single=False)
    try:
        out.todo(photos)
        names = [out.png_path(p) for p in photos]
    finally:
        out.close()
    assert len({str(n).lower() for n in names}) == len(photos)
    assert names[0].name == "a_captioned.png" and names[3].name == "x_captioned.png"
    again = Outputs(OutputConfig(png=False, output=str(tmp_path / "pngs")), single=False)
    again.todo(photos)
    assert [again.png_path(p) for p in photos] == names   # a rerun (--skip-existing) finds the same files
    again.close()


def test_names_and_captions_reach_the_terminal_escaped(capsys):
    assert printable("a\x1b[2Jb\nc\u202ed ok") == "a\\x1b[2Jb\\nc\\u202ed ok"
    warn("evil\x1b]0;title\x07\nFAKE: all good.jpg")
    err = capsys.readouterr().err
    assert "\x1b]0" not in err and "\x07" not in err and err.count("\n") == 1 and "\\n" in err
