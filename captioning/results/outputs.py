"""Where a folder run's captions go: PNGs, CSV/JSONL written as the run goes, .txt/.xmp sidecars, metadata.

The run hands each finished photo to `Outputs.submit`, which returns at once: PNGs are drawn in a worker
process, files are written by a writer thread, so encoding the next batch never waits for them. For each
photo the sidecars, metadata and PNG come first and its CSV/JSONL rows last, flushed: a row in the file
means that photo is done. That is what resuming reads: running the same command again (or with
--skip-existing) skips every photo already in the file, so a run killed at 6,000 of 10,000 photos redoes none.
No torch here: cli.py lists the photos and checks the files before the seconds-long torch import.
"""
import csv
import io
import json
import os
import queue
import threading
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from rich.markup import escape

from captioning.data.layouts import sidecar_of
from captioning.results.metadata import TAGS, ExifTool, exiftool_path, write_caption_txt, write_xmp_sidecar
from captioning.utils import IMAGE_SUFFIXES, CaptioningError, console, failure_message, printable

CSV_HEADER = ["image", "caption", "score", "tags", "confidence"]
OLD_CSV_HEADER = CSV_HEADER[:3]   # files written before tags: resumed in their own columns
# A cell starting with one of these is a formula to Excel, LibreOffice and Sheets (=HYPERLINK(...), =cmd|...):
# written with a leading ' as spreadsheet exports do, and read back without it.
FORMULA = ("=", "+", "-", "@", "\t", "\r")
# Processes drawing a folder run's PNGs: one per core, up to 4. Drawing costs about as much CPU as encoding
# and searching a photo, so on 2 cores a second drawer uses what the encoder leaves and draws the backlog at
# twice the speed once the captions are done.
PNG_WORKERS = max(1, min(4, os.cpu_count() or 1))
FIRST_SEARCH = 16   # photos in a folder run's first batched search (Pending doubles it up to the runtime's batch)


@dataclass
class Photo:
    path: Path   # as the user named it, joined with its place under that folder
    rel: Path    # its place under the folder it was found in (or its own name): PNG names mirror it


@dataclass
class Result:
    image: str
    captions: list                   # best first
    scores: list                     # length-normalised log-probabilities, same order
    words: list = field(default_factory=list)   # the best caption's words (for attention maps)
    alphas: object = None            # [words, h, w] attention of the best caption, when the decoder has it
    png: str | None = None           # the annotated picture written for it
    attention_png: str | None = None
    tags: list = field(default_factory=list)    # [{"word", "score"}] best first (grounding/head.py, grounding/concepts.py)
    confidence: float | None = None  # of the first caption, in [0, 1] (grounding/guidance.py)

    def to_json(self):
        out = {"image": self.image, "caption": self.captions[0], "captions": self.captions,
               "scores": [round(s, 4) for s in self.scores], "png": self.png, "tags": self.tags,
               "confidence": self.confidence}
        return out if self.attention_png is None else {**out, "attention_png": self.attention_png}


def make_results(vocab, grid_hw, names, hyps):
    """Search's Hypothesis lists (torch or numpy search) → one Result per image."""
    import numpy as np
    out = []
    for name, hs in zip(names, hyps):
        best = hs[0]
        alphas = None
        if best.alphas is not None and grid_hw[0]:
            alphas = np.asarray(best.alphas)[:len(best.tokens)].reshape(-1, *grid_hw)
        out.append(Result(name, [vocab.decode(h.tokens) for h in hs], [h.score for h in hs],
                          [vocab.words[t] for t in best.tokens], alphas))
    return out


@dataclass
class OutputConfig:
    png: bool = True              # False: --no-png
    output: str | None = None     # the PNG (one photo) or the PNG folder (default captioned/)
    csv: str | None = None
    jsonl: str | None = None
    txt: bool = False
    xmp: bool = False
    metadata: bool = False        # --write-metadata
    skip_existing: bool = False
    attention: bool = False


def warn(message):
    console.print(f"[yellow]Skipped: {escape(printable(message))}[/]")


def _walk(folder, recursive):
    """Image files in `folder` (and its subfolders, sorted), an unreadable subfolder as one line."""
    found = []
    for here, dirs, files in os.walk(folder, onerror=lambda e: warn(f"cannot read folder {e.filename}")):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        found += [Path(here) / f for f in sorted(files)
                  if Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def find_photos(inputs, recursive=False):
    """Files and folders → Photos in a stable order. A missing path or an empty folder is one clear error."""
    photos, seen = [], set()
    for raw in inputs:
        p = Path(raw)
        try:
            if p.is_dir():
                if not os.access(p, os.R_OK | os.X_OK):
                    raise PermissionError
                found = [Photo(q, q.relative_to(p)) for q in _walk(p, recursive)]
                if not found:
                    where = " or its subfolders" if recursive else ""
                    raise CaptioningError(f"No images (jpg, png, gif, webp, bmp, tiff) in folder{where}: {p}")
            elif p.exists():
                found = [Photo(p, Path(p.name))]
            else:
                raise CaptioningError(f"Image not found: {p}")
        except PermissionError:
            raise CaptioningError(f"No permission to read: {p}") from None
        for photo in found:
            if key(photo.path) not in seen:
                seen.add(key(photo.path))
                photos.append(photo)
    return photos


def key(path):
    """The same photo whichever way its path was written (resuming from another folder, ./a.jpg and a.jpg)."""
    return os.path.normcase(os.path.abspath(path))


class RowFile:
    """A CSV (`image,caption,score,tags,confidence`, a row per caption) or JSONL file (an object per photo,
    the fields of --json) appended as the run goes. Opening it reads which photos it already holds; a last
    line cut off by a kill is dropped, so that photo is simply done again. A CSV from before the tags keeps
    its three columns."""

    def __init__(self, path, kind):
        self.path, self.kind = Path(path), kind
        self.done, self.header = set(), CSV_HEADER
        if self.path.exists():
            self._read_existing()   # someone else's file is refused before anything in it changes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a", encoding="utf-8", newline="")
        if kind == "csv" and self.f.tell() == 0:
            self._append(_csv_line(CSV_HEADER))

    def _read_existing(self):
        with open(self.path, "rb") as f:
            data = f.read()
        cut = data.rfind(b"\n") + 1
        self.done = self._ours(data[:cut].decode("utf-8", "replace"), data[cut:])
        if cut < len(data):   # a line cut off by a kill: that photo is done again
            with open(self.path, "rb+") as f:
                f.truncate(cut)

    def _ours(self, text, tail):
        """The photos in `text` (the file's whole lines), or a one-line refusal unless all of it, and the cut-off
        `tail`, is what this class writes."""
        first = ((",".join(CSV_HEADER) + "\n").encode() if self.kind == "csv" else b'{"image": ')[:max(1, len(tail))]
        if self.kind == "csv":
            rows = list(csv.reader(io.StringIO(text)))
            if (rows and rows[0] not in (CSV_HEADER, OLD_CSV_HEADER)) or (not rows and tail and not tail.startswith(first)):
                raise CaptioningError(f"{self.path} exists and is not a caption CSV (its header is not "
                                      f"'{','.join(CSV_HEADER)}'); choose another --csv file.")
            self.header = rows[0] if rows else CSV_HEADER
            return {key(_uncell(r[0])) for r in rows[1:] if r}
        try:
            done = {key(json.loads(line)["image"]) for line in text.splitlines() if line.strip()}
        except (ValueError, KeyError, TypeError):
            done = None
        if done is None or (tail and not tail.startswith(first)):
            raise CaptioningError(f"{self.path} exists and is not a caption JSONL file (a line is not one of its "
                                  "objects); choose another --jsonl file.")
        return done

    def _append(self, text):
        self.f.write(text)
        self.f.flush()   # a kill from now on keeps this photo

    def write(self, result):
        if key(result.image) in self.done:
            return
        if self.kind == "csv":
            text = "".join(_csv_line(row[:len(self.header)]) for row in csv_rows(result))
        else:
            text = json.dumps(result.to_json(), ensure_ascii=False) + "\n"
        self._append(text)
        self.done.add(key(result.image))

    def close(self):
        self.f.close()


def _cell(text):
    return "'" + text if text.startswith(FORMULA) else text


def _uncell(text):
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA) else text


def keywords(result):
    """A Result's tags as plain words, best first: what goes into XMP, IPTC and the CSV."""
    return [t["word"] for t in result.tags]


def csv_rows(result):
    """A row per caption (CSV_HEADER's columns); each carries the photo's tags and first caption's confidence.
    Text cells that a spreadsheet would read as formulas are neutralised (_cell)."""
    tags = _cell("; ".join(keywords(result)))
    conf = "" if result.confidence is None else f"{result.confidence:.4f}"
    return [[_cell(result.image), _cell(c), f"{s:.4f}", tags, conf] for c, s in zip(result.captions, result.scores)]


def _csv_line(fields):
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(fields)
    return buf.getvalue()


def write_txt_sidecar(photo, caption):
    """photo.txt beside photo.jpg, the caption and a newline (what dataset-captioning tools read); None or a
    one-line refusal (a .txt that is not a caption sidecar is left as it is: metadata.write_caption_txt)."""
    return write_caption_txt(sidecar_of(photo), caption)


def png_names(photos):
    """Each photo's PNG under the output folder (by key): <stem>_captioned.png, unless an earlier photo (a.jpg
    before a.png, a/x.jpg before b/x.jpg from another folder) has that name, case aside: then its extension,
    and a number if need be, join the stem. Stable: the same photos in the same order get the same names."""
    plain = [p.rel.parent / f"{p.rel.stem}_captioned.png" for p in photos]
    used, out = set(str(n).lower() for n in plain), {}
    taken = Counter()
    for photo, name in zip(photos, plain):
        taken[str(name).lower()] += 1
        if taken[str(name).lower()] > 1:
            stem, n = f"{photo.rel.stem}_{photo.rel.suffix.lstrip('.').lower()}", 1
            name = photo.rel.parent / f"{stem}_captioned.png"
            while str(name).lower() in used:
                n += 1
                name = photo.rel.parent / f"{stem}_{n}_captioned.png"
            used.add(str(name).lower())
        out.setdefault(key(photo.path), name)
    return out


def _draw(image, captions, png, words, alphas, attention_png, tags=None):
    """In the PNG worker process: the captioned picture (and the attention map)."""
    from captioning.results.render import save_attention_map, save_captioned_image
    save_captioned_image(image, captions, png, tags)
    if attention_png:
        save_attention_map(image, words, alphas, attention_png)
    return str(png), attention_png and str(attention_png)


class Later:
    """A call made when its result is asked for (as a worker's future would be)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


class Outputs:
    """Every output a run asked for. `todo` picks the photos still to do, `submit` hands one finished photo
    over without waiting, `close` waits for everything to be written."""

    def __init__(self, cfg: OutputConfig, single):
        self.cfg, self.single = cfg, single
        self.png_out = Path(cfg.output) if cfg.output else Path("captioned_image.png" if single else "captioned")
        if single and self.png_out.is_dir():
            self.png_out = self.png_out / "captioned_image.png"
        self.rows = [RowFile(p, k) for p, k in ((cfg.csv, "csv"), (cfg.jsonl, "jsonl")) if p]
        self.exiftool = ExifTool() if cfg.metadata or (cfg.xmp and exiftool_path()) else None
        self.failures = []
        self.names = {}   # png_names of the run's photos, set by todo
        # spawn, not fork: a forked copy of a process running torch's threads can deadlock.
        # One photo is drawn in this process: starting a worker would cost more than the drawing.
        self.pool = ProcessPoolExecutor(PNG_WORKERS, mp_context=get_context("spawn")) if cfg.png and not single \
            else None
        if cfg.png and not single:
            self.png_out.mkdir(parents=True, exist_ok=True)   # a file in the way fails the run at once, in one line
        self.queue = queue.Queue(maxsize=512)   # bounded: a slow disk holds the run back, not memory
        self.thread = threading.Thread(target=self._write_all, name="outputs", daemon=True)
        self.thread.start()

    def png_path(self, photo):
        if self.single:
            return self.png_out
        return self.png_out / (self.names.get(key(photo.path)) or png_names([photo])[key(photo.path)])

    def _exists(self, photo):
        """With --skip-existing: whether every file output of this photo is there already."""
        cfg = self.cfg
        files = ([self.png_path(photo)] if cfg.png else []) + ([sidecar_of(photo.path)] if cfg.txt else []) \
            + ([photo.path.with_suffix(".xmp")] if cfg.xmp else [])
        return bool(files) and all(f.exists() for f in files)

    def todo(self, photos):
        """The photos not done yet: those in every CSV/JSONL given are (a rerun resumes), and with
        --skip-existing those whose sidecars and PNG exist."""
        self.names = png_names(photos)
        left = [p for p in photos if not (self.rows and all(key(p.path) in r.done for r in self.rows))]
        if self.cfg.skip_existing:
            left = [p for p in left if self.rows or not self._exists(p)]
        if len(left) < len(photos):
            console.print(f"{len(photos) - len(left):,} of {len(photos):,} photo(s) already captioned; "
                          f"{len(left):,} to do.")
        return left

    def submit(self, photo, result):
        """Queue one captioned photo's outputs (the PNG starts drawing now, in the worker)."""
        drawing = None
        if self.cfg.png:
            png = self.png_path(photo)
            att = png.with_name(png.stem + "_attention.png") if self.cfg.attention and result.alphas is not None \
                else None
            job = (_draw, str(photo.path), result.captions, png, result.words, result.alphas, att, result.tags)
            drawing = self.pool.submit(*job) if self.pool else Later(*job)
        self.queue.put((photo, result, drawing))

    def _write_all(self):
        while (item := self.queue.get()) is not None:
            try:
                self._write(*item)
            except Exception as e:   # one photo's failure costs that photo only; said in one line
                self._fail(f"{item[0].path}: {failure_message(e)}")

    def _fail(self, message):
        self.failures.append(message)
        if not self.single:   # one photo's failure is the run's: caption_files raises it as the one line
            warn(message)

    def _write(self, photo, result, drawing):
        caption, ok = result.captions[0], True
        lossless = photo.path.suffix.lower() in TAGS
        if self.cfg.metadata and not lossless:   # said, but the photo counts as done: no rerun can do better
            warn(f"{photo.path}: cannot write metadata into {photo.path.suffix} files without re-encoding them")
        steps = [(self.cfg.txt, lambda: write_txt_sidecar(photo.path, caption)),
                 (self.cfg.xmp, lambda: write_xmp_sidecar(photo.path.with_suffix(".xmp"), caption, self.exiftool,
                                                          keywords(result))),
                 (self.cfg.metadata and lossless, lambda: self.exiftool.write(photo.path, caption,
                                                                              keywords=keywords(result)))]
        for wanted, step in steps:
            if not wanted:
                continue
            try:
                problem = step()
            except OSError as e:
                problem = f"{photo.path}: {failure_message(e)}"
            if problem:
                ok = False
                self._fail(problem)
        if drawing is not None:
            try:
                result.png, result.attention_png = drawing.result()
            except Exception as e:
                ok = False
                self._fail(f"{photo.path}: PNG not drawn ({failure_message(e)})")
        if ok:   # the row marks the photo done: only once all its outputs are written
            for rows in self.rows:
                rows.write(result)

    def close(self):
        self.queue.put(None)
        self.thread.join()
        if self.pool:
            self.pool.shutdown()
        if self.exiftool:
            self.exiftool.close()
        for rows in self.rows:
            rows.close()


class Pending:
    """Photos encoded and waiting for one batched search (either runtime): `flush` searches their features
    together, hands each Result to `sink` and keeps it in `results`. `concat` joins feature batches.

    The first searches are small and each next one twice as large, up to `batch` (large batches search
    faster per photo): the drawing processes and the output files get their first photos after a second,
    not after the first `batch` photos are encoded. With `background`, each search runs in a thread of its
    own while the caller encodes the next photos (torch's kernels release the GIL), so a run with one torch
    thread keeps both cores busy; at most one search runs while the next batch fills. `finish` waits."""

    def __init__(self, captioner, cfg, keep_alphas, sink, concat, batch, background=False):
        self.captioner, self.cfg, self.keep_alphas, self.sink, self.concat = captioner, cfg, keep_alphas, sink, concat
        self.feats, self.photos, self.results = [], [], []
        self.batch, self.size = batch, min(batch, FIRST_SEARCH)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="search") if background else None
        self.running = None

    def add(self, photos, feats):
        self.photos += photos
        self.feats.append(feats)
        if len(self.photos) >= self.size:
            self.flush()
            self.size = min(self.batch, 2 * self.size)

    def flush(self):
        if not self.photos:
            return
        photos, feats = self.photos, self.concat(self.feats)
        self.feats, self.photos = [], []
        if self.worker is None:
            return self._search(photos, feats)
        self._wait()
        self.running = self.worker.submit(self._search, photos, feats)

    def _search(self, photos, feats):
        hyps = self.captioner.search(feats, self.cfg, self.keep_alphas)
        for photo, res in zip(photos, self.captioner.results([str(p.path) for p in photos], hyps)):
            self.sink.submit(photo, res)
            self.results.append(res)

    def _wait(self):
        if self.running is not None:
            running, self.running = self.running, None
            running.result()   # a search's error is raised here, in the caller's thread

    def finish(self, search_rest=True):
        """Search what is left (unless the run is being stopped) and wait for the search under way."""
        try:
            if search_rest:
                self.flush()
            self._wait()
        finally:
            if self.worker:
                self.worker.shutdown()


def caption_photos(stream, inputs, opts: OutputConfig, paths=None, has_attention=True):
    """Caption files/folders with `stream(photos, sink) → (results, failures)` (a runtime's batched work,
    handing each Result to `sink.submit`) and write what `opts` asks for; returns the Results of the photos
    captioned now. One image named alone → `opts.output` is the PNG path (default captioned_image.png);
    several → a folder. Any runtime (torch, ONNX) shares this part."""
    photos = [p if isinstance(p, Photo) else Photo(Path(p), Path(Path(p).name)) for p in paths] if paths \
        else find_photos(inputs)
    single = len(inputs) == 1 and len(photos) == 1 and not Path(inputs[0]).is_dir()   # as the user named them
    sink = Outputs(opts, single)
    try:
        results, failures = stream(sink.todo(photos), sink)
    finally:
        sink.close()
    if sink.failures and single:
        raise CaptioningError(sink.failures[0])
    if failures and single:
        raise CaptioningError(failures[0])
    for f in failures:
        warn(f)
    if opts.attention and not has_attention:
        console.print("[yellow]This model has no attention (lstm decoder); no attention map was drawn.[/]")
    return results
