"""A folder run's outputs without a model: listing photos, resumable CSV/JSONL, the batched searches (their
sizes, order and thread), sidecars, and metadata written into JPEG/PNG/WebP copies, read back with Pillow (an
independent reader: the writer is exiftool)."""
import json
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from captioning.captioner import Result
from captioning.metadata import ExifTool, exiftool_path, write_xmp_sidecar
from captioning.outputs import FIRST_SEARCH, Pending, Photo, RowFile, find_photos, key
from captioning.utils import CaptioningError

needs_exiftool = pytest.mark.skipif(exiftool_path() is None, reason="exiftool not installed "
                                    "(apt-get install libimage-exiftool-perl)")
CAPTION = "a dog’s day: café <b> & “quotes” — 日本"


def photo(path, fmt=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(a).save(path, format=fmt, **kw)
    return path


def result(image, captions=("a dog runs",), scores=(-1.5,)):
    return Result(str(image), list(captions), list(scores))


def test_find_photos_recursive_stable_and_relative(tmp_path):
    for rel in ("b/IMG_0001.jpg", "a/IMG_0001.jpg", "a/z/deep.png", "top.jpg", ".hidden/x.jpg", "notes.txt"):
        photo(tmp_path / rel, "PNG")
    flat = find_photos([tmp_path])
    assert [str(p.rel) for p in flat] == ["top.jpg"]
    deep = find_photos([tmp_path, tmp_path / "top.jpg"], recursive=True)   # the same photo twice: once
    assert [str(p.rel) for p in deep] == ["a/IMG_0001.jpg", "a/z/deep.png", "b/IMG_0001.jpg", "top.jpg"]
    assert deep[0].path == tmp_path / "a" / "IMG_0001.jpg"
    with pytest.raises(CaptioningError, match="No images"):
        find_photos([tmp_path / ".hidden"] if False else [photo(tmp_path / "c" / "d" / "x.jpg").parents[1]])


def test_csv_rows_resume_and_a_cut_off_line_is_dropped(tmp_path):
    path = tmp_path / "out.csv"
    rows = RowFile(path, "csv")
    rows.write(result(tmp_path / "a.jpg", ["one, with a comma", "two"], [-1.0, -2.0]))
    rows.write(result(tmp_path / "a.jpg"))                    # already there: not written twice
    rows.close()
    with open(path, "a") as f:
        f.write(f"{tmp_path / 'b.jpg'},half a row")             # what a kill mid-write could leave
    again = RowFile(path, "csv")
    assert again.done == {key(tmp_path / "a.jpg")}
    again.write(result(tmp_path / "b.jpg"))
    again.close()
    assert path.read_text() == (f'image,caption,score\n{tmp_path / "a.jpg"},"one, with a comma",-1.0000\n'
                                f'{tmp_path / "a.jpg"},two,-2.0000\n{tmp_path / "b.jpg"},a dog runs,-1.5000\n')


def test_someone_elses_csv_is_refused_not_appended_to(tmp_path):
    path = tmp_path / "budget.csv"
    path.write_text("month,amount\njan,3\n")
    with pytest.raises(CaptioningError, match="not a caption CSV"):
        RowFile(path, "csv")
    assert path.read_text() == "month,amount\njan,3\n"


def test_jsonl_has_the_json_fields(tmp_path):
    path = tmp_path / "out.jsonl"
    rows = RowFile(path, "jsonl")
    rows.write(result("x/a.jpg"))
    rows.close()
    assert json.loads(path.read_text()) == {"image": "x/a.jpg", "caption": "a dog runs", "captions": ["a dog runs"],
                                            "scores": [-1.5], "png": None, "tags": [], "confidence": None}
    assert RowFile(path, "jsonl").done == {key("x/a.jpg")}


class Searcher:
    """A runtime's search as Pending uses it: records each batch's size and thread; captions name the photo."""

    def __init__(self, fail_at=None):
        self.sizes, self.threads, self.fail_at = [], set(), fail_at

    def search(self, feats, cfg, keep_alphas):
        if len(self.sizes) == self.fail_at:
            raise RuntimeError("out of memory")
        self.sizes.append(len(feats))
        self.threads.add(threading.current_thread().name)
        return [f"caption {int(x)}" for x in feats]

    def results(self, names, hyps):
        return [result(n, [h]) for n, h in zip(names, hyps)]


class Sink:
    def __init__(self):
        self.got = []

    def submit(self, photo, res):
        self.got.append((photo.path.name, res.captions[0]))


def fill(pending, n, per_batch=8):
    for i in range(0, n, per_batch):
        ids = range(i, min(n, i + per_batch))
        pending.add([Photo(Path(f"{j}.jpg"), Path(f"{j}.jpg")) for j in ids], list(ids))


@pytest.mark.parametrize("background", [False, True])
def test_pending_searches_grow_to_the_batch_and_keep_every_photo_in_order(background):
    searcher, sink = Searcher(), Sink()
    pending = Pending(searcher, None, False, sink, lambda parts: sum(parts, []), 128, background)
    fill(pending, 500)
    pending.finish()
    assert FIRST_SEARCH == 16 and searcher.sizes == [16, 32, 64, 128, 128, 128, 4]   # 500 photos in all
    assert sink.got == [(f"{i}.jpg", f"caption {i}") for i in range(500)]
    assert [r.image for r in pending.results] == [f"{i}.jpg" for i in range(500)]
    assert (searcher.threads == {threading.current_thread().name}) != background   # beside the caller, or not


def test_pending_raises_a_background_search_error_in_the_caller():
    pending = Pending(Searcher(fail_at=1), None, False, Sink(), lambda parts: sum(parts, []), 128, True)
    with pytest.raises(RuntimeError, match="out of memory"):
        fill(pending, 200)
        pending.finish()


def test_pending_stopped_searches_nothing_more():
    searcher, sink = Searcher(), Sink()
    pending = Pending(searcher, None, False, sink, lambda parts: sum(parts, []), 128, True)
    fill(pending, 40)             # 16 searched, 24 waiting
    pending.finish(search_rest=False)
    assert searcher.sizes == [16] and len(sink.got) == 16


def test_xmp_sidecar_is_valid_xml_with_both_fields(tmp_path):
    write_xmp_sidecar(tmp_path / "p.xmp", CAPTION)
    assert want(xmp_fields((tmp_path / "p.xmp").read_text(encoding="utf-8")))


@needs_exiftool
def test_existing_xmp_sidecar_keeps_its_other_fields(tmp_path):
    path = tmp_path / "raw.xmp"
    path.write_text('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-'
                    'syntax-ns#"><rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
                    'xmp:Rating="4"/></rdf:RDF></x:xmpmeta>')
    tool = ExifTool()
    try:
        assert write_xmp_sidecar(path, "a red kite", tool) is None
    finally:
        tool.close()
    text = path.read_text()
    assert "a red kite" in text and 'Rating' in text and "4" in text


# ---- metadata inside the photo ------------------------------------------------------------------------

def jpeg_scan(data):
    """The JPEG's entropy-coded image data: from the start-of-scan marker to the end."""
    return data[data.index(b"\xff\xda"):]


def png_chunks(data):
    out, i = [], 8
    while i < len(data):
        n, kind = struct.unpack(">I4s", data[i:i + 8])
        out.append((kind.decode(), data[i + 8:i + 8 + n]))
        i += 12 + n
    return out


def webp_chunks(data):
    out, i = [], 12
    while i < len(data):
        kind, n = data[i:i + 4].decode(), struct.unpack("<I", data[i + 4:i + 8])[0]
        out.append((kind, data[i + 8:i + 8 + n]))
        i += 8 + n + (n & 1)
    return out


def xmp_fields(packet):
    """{element name: its rdf:li text} of an XMP packet, parsed as XML (escaping and all)."""
    import xml.etree.ElementTree as ET
    text = packet.decode("utf-8") if isinstance(packet, bytes) else packet
    root = ET.fromstring(text[text.index("<x:xmpmeta"):text.rindex("</x:xmpmeta>") + len("</x:xmpmeta>")])
    return {e.tag.split("}")[1]: next(li.text for li in e.iter() if li.tag.endswith("}li"))
            for e in root.iter() if any(li.tag.endswith("}li") for li in e.iter()) and not e.tag.endswith(("}li",
                                                                                                          "}Alt"))}


def want(fields):
    return fields.get("description") == CAPTION and fields.get("AltTextAccessibility") == CAPTION


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@needs_exiftool
def test_metadata_into_jpeg_png_webp_losslessly(tmp_path):
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "Canon", "EOS 5D", 6   # make, model, orientation
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    files = {"p.jpg": photo(tmp_path / "p.jpg", "JPEG", exif=exif.tobytes(), icc_profile=icc, quality=90),
             "p.png": photo(tmp_path / "p.png", "PNG"), "p.webp": photo(tmp_path / "p.webp", "WEBP", quality=80)}
    before = {n: p.read_bytes() for n, p in files.items()}
    decoded = {n: pixels(p) for n, p in files.items()}
    tool = ExifTool()
    try:
        assert [tool.write(p, CAPTION) for p in files.values()] == [None, None, None]
    finally:
        tool.close()
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []   # replaced by rename, nothing left
    for name, path in files.items():
        assert np.array_equal(pixels(path), decoded[name]), name

    data = files["p.jpg"].read_bytes()
    assert jpeg_scan(data) == jpeg_scan(before["p.jpg"])           # the scan data byte-for-byte
    with Image.open(files["p.jpg"]) as im:
        kept = im.getexif()
        xmp = im.info["xmp"].decode("utf-8")
        assert im.info.get("icc_profile") == icc
    assert kept[0x010F] == "Canon" and kept[0x0110] == "EOS 5D" and kept[0x0112] == 6
    # EXIF ImageDescription: an "ASCII" field that writers fill with UTF-8 bytes; Pillow hands them as Latin-1.
    assert kept[0x010E].encode("latin-1").decode("utf-8") == CAPTION
    assert want(xmp_fields(xmp))

    before_chunks, chunks = png_chunks(before["p.png"]), png_chunks(files["p.png"].read_bytes())
    kinds = [k for k, _ in chunks]
    assert [c for c in chunks if c[0] == "IDAT"] == [c for c in before_chunks if c[0] == "IDAT"]
    xmp_at = next(i for i, (k, d) in enumerate(chunks) if k == "iTXt" and d.startswith(b"XML:com.adobe.xmp"))
    assert xmp_at < kinds.index("IDAT")                            # readers that stop at the image see it
    with Image.open(files["p.png"]) as im:
        assert im.text["Description"] == CAPTION
        assert want(xmp_fields(im.info["XML:com.adobe.xmp"]))

    before_w, after_w = dict(webp_chunks(before["p.webp"])), dict(webp_chunks(files["p.webp"].read_bytes()))
    assert after_w["VP8 "] == before_w["VP8 "]                     # the bitstream untouched
    assert want(xmp_fields(after_w["XMP "]))


@needs_exiftool
def test_metadata_refuses_what_it_cannot_do_and_leaves_it(tmp_path):
    gif = photo(tmp_path / "p.gif", "GIF")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    data = {p: p.read_bytes() for p in (gif, broken)}
    tool = ExifTool()
    try:
        assert "without re-encoding" in tool.write(gif, "x")
        message = tool.write(broken, "x")
        assert message.startswith(str(broken)) and "\n" not in message
    finally:
        tool.close()
    assert {p: p.read_bytes() for p in data} == data
