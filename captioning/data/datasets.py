"""Captioning datasets on disk: detect the layout, load records, split by image (annotations.py reads the
annotation files, download.py fetches datasets).

Every layout is reduced to the same thing: a sorted list of Records (image path, raw captions, split).
The layout is detected from the files present, so a user never has to say which dataset they have:

    mini-coco   captions.json (flat [{image_id, caption}] or a COCO dict) + Images/COCO_train2014_{id:012d}.jpg
    flickr8k    captions.txt (CSV: image,caption) + Images/, optional splits/Flickr_8k.{train,dev,test}Images.txt
    karpathy    dataset_*.json ({"images": [{filename, filepath?, split, sentences}]}), restval counts as train
    coco        captions_*.json (official COCO captions) + images in Images/, train2014/ ... or beside it

and the layouts people's own photos come in (their readers: layouts.py): imagefolder (Hugging Face
metadata.csv/jsonl, train/ validation/ test/ folders as splits), flickr30k (results.csv), flickr8k-text
(Flickr8k.token.txt) and sidecars (photos with same-name .txt captions, looked for last, in subfolders too).

No torch here: the CLI imports this module for --help and the menu, which must start instantly.
"""
import fnmatch
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from captioning.data import annotations, layouts
from captioning.utils import CaptioningError
from captioning.data.vocab import tokenize

SPLITS = ("train", "val", "test")
FLICKR_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                      "test": "Flickr_8k.testImages.txt"}


@dataclass
class Record:
    image: Path          # absolute path of the image file
    captions: list[str]  # raw caption text, stripped, never empty
    split: str           # "train" | "val" | "test"


@dataclass
class Dataset:
    root: Path             # the folder the dataset was found in (may be one level below what the user gave)
    layout: str            # one of annotations.LAYOUTS
    records: list[Record]  # sorted by image path
    missing: int = 0       # images listed in the annotations but not on disk (skipped)
    unsplit: int = 0       # images left out because official split files exist and do not list them
    skipped: int = 0       # broken annotation rows skipped (Flickr30k), or photos without a .txt (sidecars)

    def split(self, name):
        name = {"dev": "val"}.get(name, name)
        if name not in SPLITS:
            raise CaptioningError(f"Unknown split '{name}': choose one of {', '.join(SPLITS)}.")
        return [r for r in self.records if r.split == name]


# ----------------------------------------------------------------------------------------------------------
# layout detection

def _layout_of(name):
    """The layout an annotation file name belongs to, or None."""
    return next((layout for layout, patterns in annotations.LAYOUTS.items()
                 if any(fnmatch.fnmatchcase(name, p) for p in patterns.split("|"))), None)


def _detect(folder):
    """(layout, annotation files) for a folder, or None. Cheap: looks at file names only."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    if os.path.isdir(folder / "annotations"):  # official COCO keeps captions_*.json in annotations/
        names += sorted(f"annotations/{n}" for n in os.listdir(folder / "annotations") if _layout_of(n) == "coco")
    if not any(n in layouts.METADATA_FILES for n in names):  # imagefolder: train/ validation/ test/ are splits
        for d in list(names):
            if d.lower() in layouts.IMAGEFOLDER_SPLITS and os.path.isdir(folder / d):
                names += sorted(f"{d}/{n}" for n in os.listdir(folder / d) if n in layouts.METADATA_FILES)
    for layout in annotations.LAYOUTS:
        files = [folder / n for n in names if _layout_of(Path(n).name) == layout]
        if files:
            return layout, files
    return None


def _find(root):
    """Detect the layout in root, else in exactly one folder one level down (kagglehub downloads often nest)."""
    found = _detect(root)
    if found:
        return root, found
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    hits = [(d, f) for d in subdirs if (f := _detect(d))]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise CaptioningError(f"{root} holds several datasets ({', '.join(d.name for d, _ in hits)}): "
                              f"point at one of them.")
    # Last: a photo library captioned with `caption --txt` (and perhaps corrected by hand).
    photos, _ = layouts.find_sidecar_photos(root)
    if photos:
        return root, (annotations.SIDECARS, photos)
    known = ", ".join(f"{k} ({v.replace('|', ' or ')})" for k, v in annotations.LAYOUTS.items())
    raise CaptioningError(f"No captioning dataset found in {root}. Known layouts: {known}, with the images; "
                          f"or {annotations.SIDECARS} (photos with same-name .txt captions).")


class _ImageIndex:
    """Finds image files by listing each directory once: a set lookup per image, no stat or PIL per image."""

    def __init__(self, bases):
        self.bases = [b for b in dict.fromkeys(bases) if b.is_dir()]
        self.listings = {}

    def _names(self, folder):
        if folder not in self.listings:
            self.listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        return self.listings[folder]

    def find(self, candidates):
        for base in self.bases:
            for rel in candidates:
                path = base / rel
                if path.name in self._names(path.parent):
                    return path
        return None


def _hash_split(names):
    """Deterministic split by a hash of the file name: ~90/5/5, with val and test never empty from 3 images up.

    Hashing the name (not the position in a list) keeps an image's split stable when the dataset grows."""
    key = {n: int(hashlib.sha1(n.encode("utf-8")).hexdigest()[:12], 16) / 16 ** 12 for n in names}
    split = {n: "train" if key[n] < 0.90 else "val" if key[n] < 0.95 else "test" for n in names}
    if len(names) >= 3:
        for need in ("val", "test", "train"):
            if need not in split.values():
                counts = {s: sum(v == s for v in split.values()) for s in SPLITS}
                donor = max(SPLITS, key=lambda s: counts[s])  # ties resolve in SPLITS order
                split[max((n for n in names if split[n] == donor), key=lambda n: (key[n], n))] = need
    return split


def _read_split_files(folders):
    """{file name: split} from Flickr_8k.{train,dev,test}Images.txt, when all three sit in one of `folders`."""
    for folder in folders:
        paths = {s: folder / f for s, f in FLICKR_SPLIT_FILES.items()}
        if all(p.is_file() for p in paths.values()):
            split = {}
            for s, p in paths.items():
                for line in p.read_text(encoding="utf-8-sig").splitlines():
                    if line.strip():
                        split[line.strip()] = s
            return split
    return None


def _has_words(caption):
    """Whether a caption has a word the tokenizer keeps: "", "  " or "..." would train on nothing."""
    if caption.isascii():  # the common case, fast: for ASCII a word is a letter or digit
        return any(ch.isalnum() for ch in caption)
    return bool(tokenize(caption))


def load_dataset(root):
    """Load any known captioning dataset under `root` (a folder, or the annotation file itself)."""
    try:
        return _load_dataset(root)
    except OSError as e:  # a folder or file without read permission, a vanished file: one sentence, not a trace
        what = e.filename or root
        raise CaptioningError(f"Could not read {what}: {e.strerror or e}.") from None


def _load_dataset(root):
    given = Path(os.path.abspath(os.path.expanduser(str(root))))
    folder, layout, files = _locate(given)
    entries, skipped = [], 0
    for path in files:
        found, bad = annotations.parse(layout, path, folder)
        entries += found
        skipped += bad
    if layout == annotations.SIDECARS:   # photos that have no caption yet are left out, and counted
        skipped += len(layouts.find_sidecar_photos(folder)[1])

    index, missing, found = _ImageIndex(_image_bases(folder, layout, files)), 0, []
    for names, (caps, split) in _by_image(entries).items():
        path = index.find(names)
        if path is None:
            missing += 1
        else:
            found.append((path, caps, split))
    if not found:
        where = f"; {missing} images listed but none found under {folder}" if missing else ""
        raise CaptioningError(f"No captioned images in {', '.join(str(p) for p in files)}{where}.")

    found, unsplit = _with_splits(found, layout, [folder, folder / "splits", given, given / "splits"])
    records = sorted((Record(p, c, s) for p, c, s in found), key=lambda r: str(r.image))
    if not records:
        raise CaptioningError(f"No images of {folder} are listed in its split files.")
    return Dataset(root=folder, layout=layout, records=records, missing=missing, unsplit=unsplit, skipped=skipped)


def _locate(given):
    """(dataset folder, layout, annotation files) for a folder or an annotation file itself."""
    if not given.exists():
        raise CaptioningError(f"Dataset folder {given} does not exist.")
    if not given.is_file():
        folder, (layout, files) = _find(given)
        return folder, layout, files
    layout = _layout_of(given.name)
    if layout is None:
        raise CaptioningError(f"{given} is not an annotation file of a known layout "
                              f"({', '.join(annotations.LAYOUTS)}).")
    folder = given.parent.parent if given.parent.name == "annotations" else given.parent
    return folder, layout, [given]


def _image_bases(folder, layout, files):
    """The folders where a layout's images may be, most likely first."""
    # Images/ (Kaggle), train2014/ for captions_train2014.json (official COCO), the folder itself; Kaggle's
    # Flickr30k nests flickr30k_images/, Flickr8k's original zips sit Flickr8k_text/ beside the photos.
    bases = [folder / "Images", folder / "images", folder / "flickr30k_images"]
    bases += [folder / p.stem.removeprefix("captions_") for p in files if layout == "coco"] + [folder]
    if layout == "flickr8k-text":
        bases += [d / n for d in (folder, folder.parent) for n in ("Flicker8k_Dataset", "Flickr8k_Dataset")]
    return bases


def _by_image(entries):
    """{image names: (captions, split)}: a name may appear in several files; captions are stripped and
    those without a word dropped, and so are images left with none."""
    grouped = {}
    for names, caps, split in entries:
        caps = [c.strip() for c in caps if isinstance(c, str) and _has_words(c)]
        if not caps:
            continue
        if names in grouped:
            grouped[names][0].extend(caps)
        else:
            grouped[names] = (caps, split)
    return grouped


def _with_splits(found, layout, split_folders):
    """Each (path, captions, split) with its split: the dataset's own (Karpathy), else the official split
    files (Flickr8k; images not in them are left out and counted), else a hash of the file name.
    Returns (found, how many were left out)."""
    unsplit = 0
    official = _read_split_files(split_folders) if layout in ("flickr8k", "flickr8k-text") else None
    if official is not None:
        kept = [(p, c, official[p.name]) for p, c, _ in found if p.name in official]
        unsplit, found = len(found) - len(kept), kept
    if any(s is None for _, _, s in found):
        hashed = _hash_split(sorted({p.name for p, _, s in found if s is None}))
        found = [(p, c, s or hashed[p.name]) for p, c, s in found]
    return found, unsplit
