"""Readers for the layouts people's own captioned photos come in (datasets.py detects them and loads them).

    imagefolder    Hugging Face `imagefolder`: metadata.csv / metadata.jsonl with `file_name` and a caption
                   column (`text`, `caption`, or `caption_0` ... `caption_N`), at the top or in train/,
                   validation/, test/ folders, which are then the splits
    flickr30k      Kaggle's Flickr30k: results.csv, `image_name| comment_number| comment`, pipe-separated;
                   rows without all three fields (the real file has one) are skipped and counted
    flickr8k-text  Flickr8k's original Flickr8k.token.txt: `name.jpg#0<TAB>caption` lines
    sidecars       a folder (and its subfolders) of photos with a same-name .txt caption beside each, as
                   `caption --txt` writes them: caption, correct by hand, train

Each reader returns (entries, skipped): entries as datasets.py takes them, [(candidate image paths relative
to the dataset folder, [captions], split or None)], and how many rows it had to skip.
No torch here (see datasets.py).
"""
import csv
import json
import os
import re
from collections import defaultdict
from pathlib import Path

from captioning.utils import IMAGE_SUFFIXES, CaptioningError

# Hugging Face's split folder names → ours.
IMAGEFOLDER_SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val",
                      "test": "test"}
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
CAPTION_COLUMN = re.compile(r"text|caption|caption_\d+")


def _open_text(path):
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CaptioningError(f"Could not read {path}: {e}.") from None


def _caption_columns(path, columns):
    found = [c for c in columns if CAPTION_COLUMN.fullmatch(c)]
    if "file_name" not in columns or not found:
        raise CaptioningError(f"{path}: expected a 'file_name' column and a caption column (text, caption or "
                              f"caption_0 ... caption_N), found {', '.join(columns) or 'none'}.")
    return found


def _imagefolder_rows(path):
    """[(line number, {column: value})] of a metadata.csv or metadata.jsonl, with one-line errors."""
    text, rows = _open_text(path), []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CaptioningError(f"{path} line {n}: not valid JSON ({e.msg}).") from None
            if not isinstance(row, dict):
                raise CaptioningError(f"{path} line {n}: expected a JSON object, found {line[:60]!r}.")
            _caption_columns(f"{path} line {n}", list(row))
            rows.append((n, row))
        return rows
    reader = csv.reader(text.splitlines(), strict=True)
    try:
        header = [h.strip() for h in next(reader, [])]
        columns = _caption_columns(path, header)
        for row in reader:
            if not any(row):
                continue
            if len(row) != len(header):
                raise CaptioningError(f"{path} line {reader.line_num}: expected {len(header)} fields "
                                      f"({','.join(header)}), found {len(row)}; quote captions that hold commas.")
            rows.append((reader.line_num, dict(zip(header, row))))
    except csv.Error as e:
        raise CaptioningError(f"{path} line {reader.line_num}: malformed CSV ({e}).") from None
    return [(n, {k: row[k] for k in ["file_name", *columns]}) for n, row in rows]


def read_imagefolder(path, folder):
    """Entries of one metadata file; in a train/ validation/ test/ folder, that folder is their split."""
    sub = path.parent.relative_to(folder) if path.parent != folder else None
    split = IMAGEFOLDER_SPLITS.get(sub.name.lower()) if sub else None
    out = []
    for n, row in _imagefolder_rows(path):
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise CaptioningError(f"{path} line {n}: 'file_name' is empty.")
        caps = []
        for key, value in row.items():
            if key != "file_name" and CAPTION_COLUMN.fullmatch(key):
                caps += value if isinstance(value, list) else [value]
        rel = Path(name.strip())
        out.append(((str(sub / rel) if sub else str(rel),), caps, split))
    return out, 0


def read_flickr30k(path, folder=None):
    """results.csv: `image_name| comment_number| comment`. Rows lacking a field are skipped and counted:
    one bad row of Kaggle's file must not make the other 158,914 captions unusable."""
    lines = _open_text(path).splitlines()
    header = [h.strip() for h in lines[0].split("|")] if lines else []
    if header != ["image_name", "comment_number", "comment"]:
        raise CaptioningError(f"{path} line 1: expected the header 'image_name| comment_number| comment', "
                              f"found {(lines or [''])[0][:80]!r}.")
    captions, skipped = defaultdict(list), 0
    for line in lines[1:]:
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) < 3 or not parts[0].strip():
            skipped += 1
            continue
        captions[parts[0].strip()].append("|".join(parts[2:]))  # a caption may itself hold a pipe
    return [((name,), caps, None) for name, caps in captions.items()], skipped


def read_flickr8k_token(path, folder=None):
    """Flickr8k.token.txt: `name.jpg#0<TAB>caption` per line."""
    captions = defaultdict(list)
    for n, line in enumerate(_open_text(path).splitlines(), 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_, _ = key.rpartition("#")
        if not tab or not hash_ or not name.strip():
            raise CaptioningError(f"{path} line {n}: expected 'name.jpg#0<TAB>caption', found {line[:60]!r}.")
        captions[name.strip()].append(caption)
    return [((name,), caps, None) for name, caps in captions.items()], 0


def sidecar_of(photo):
    """The caption sidecar of a photo: photo.txt beside photo.jpg (what `caption --txt` writes)."""
    return Path(photo).with_suffix(".txt")


def find_sidecar_photos(root):
    """(photos that have a .txt sidecar, photos that have none) under root and its subfolders, sorted."""
    with_txt, without = [], []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = set(files)
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                (with_txt if Path(name).stem + ".txt" in names else without).append(Path(here) / name)
    return with_txt, without


def read_sidecar(photo, folder=None):
    """One photo's entry: each non-empty line of its sidecar is one caption (usually there is one)."""
    caps = [line for line in _open_text(sidecar_of(photo)).splitlines() if line.strip()]
    return [((str(photo),), caps, None)], 0
