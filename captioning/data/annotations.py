"""The layouts' registry and their annotation-file readers, with errors that name the file and line
(datasets.py detects the layout and loads the records; the readers of the layouts people's own photos come
in are layouts.py's). A new layout: its file pattern in LAYOUTS and, unless it is one of the built-in
parsers below, its reader in READERS.

No torch here (see datasets.py).
"""
import csv
import json
from collections import defaultdict

from captioning.data import layouts
from captioning.utils import CaptioningError

# Layout → its annotation file pattern. The order decides when a folder holds several.
LAYOUTS = {"mini-coco": "captions.json", "flickr8k": "captions.txt", "karpathy": "dataset_*.json",
           "coco": "captions_*.json", "imagefolder": "metadata.csv|metadata.jsonl", "flickr30k": "results.csv",
           "flickr8k-text": "Flickr8k.token.txt"}
SIDECARS = "sidecars"   # no annotation file: photos with a same-name .txt (layouts.py)
READERS = {"imagefolder": layouts.read_imagefolder, "flickr30k": layouts.read_flickr30k,
           "flickr8k-text": layouts.read_flickr8k_token, SIDECARS: layouts.read_sidecar}
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _read_json(path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CaptioningError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CaptioningError(f"Could not read {path}: {e}.") from None


def _read_flickr_csv(path):
    """{image file name: [captions]} from a captions.txt with header `image,caption` and quoted fields."""
    captions = defaultdict(list)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, strict=True)  # strict: an unterminated quote is an error, not a silent merge
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
                raise CaptioningError(f"{path} line 1: expected the header 'image,caption', found {header!r}.")
            for row in reader:
                if not row or not any(row):
                    continue
                if len(row) < 2:
                    raise CaptioningError(f"{path} line {reader.line_num}: expected 'image,caption', "
                                          f"found {','.join(row)!r}.")
                # An unquoted caption with commas splits into more fields; everything after the image is caption.
                captions[row[0].strip()].append(",".join(row[1:]))
    except csv.Error as e:
        raise CaptioningError(f"{path} line {reader.line_num}: malformed CSV ({e}).") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CaptioningError(f"Could not read {path}: {e}.") from None
    return captions


def _entries(path, data, key, fields):
    """data[key] (or data itself when key is None) as a list of dicts having `fields`, else a clear error."""
    items = data if key is None else data.get(key)
    if not isinstance(items, list):
        raise CaptioningError(f"{path}: expected a list under '{key}'." if key else f"{path}: expected a list.")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or any(k not in item for k in fields):
            where = f"'{key}' entry {i}" if key else f"entry {i}"
            raise CaptioningError(f"{path}: {where} lacks {' / '.join(fields)}: {str(item)[:80]}")
    return items


# ----------------------------------------------------------------------------------------------------------
# each layout parses into entries: [(candidate relative image paths, [captions], split or None)]

def _coco_name(image_id):
    """Mini COCO names its files after the image id."""
    return f"COCO_train2014_{int(image_id):012d}.jpg" if str(image_id).isdigit() else str(image_id)


def _parse_coco(path, data):
    """A COCO dict (images {id, file_name} + annotations {image_id, caption}), or Mini COCO's flat list."""
    caps, names = defaultdict(list), {}
    if isinstance(data, dict):
        names = {img["id"]: img["file_name"] for img in _entries(path, data, "images", ["id", "file_name"])}
        items = _entries(path, data, "annotations", ["image_id", "caption"])
    else:
        items = _entries(path, data, None, ["image_id", "caption"])
    for item in items:
        caps[item["image_id"]].append(item["caption"])
    return [((names.get(i) or _coco_name(i),), c, None) for i, c in caps.items()]


def _parse_karpathy(path, data):
    if not isinstance(data, dict):
        raise CaptioningError(f"{path}: expected a Karpathy split dict with 'images'.")
    out = []
    for img in _entries(path, data, "images", ["filename", "sentences"]):
        raw = img.get("split")
        if raw is not None and raw not in KARPATHY_SPLITS:
            raise CaptioningError(f"{path}: image {img['filename']} has unknown split '{raw}' "
                                  f"(expected one of {', '.join(KARPATHY_SPLITS)}).")
        caps = [s.get("raw") or " ".join(s.get("tokens", [])) for s in img["sentences"] if isinstance(s, dict)]
        # COCO's Karpathy file says filepath "val2014"; also accept all images flat in one folder.
        names = (f"{img['filepath']}/{img['filename']}", img["filename"]) if img.get("filepath") else (img["filename"],)
        out.append((names, caps, KARPATHY_SPLITS.get(raw)))
    return out


def parse(layout, path, folder):
    """(entries, rows skipped) of one annotation file (or, for sidecars, one photo)."""
    if layout in READERS:
        return READERS[layout](path, folder)
    if layout == "flickr8k":
        return [((name,), caps, None) for name, caps in _read_flickr_csv(path).items()], 0
    data = _read_json(path)
    return (_parse_karpathy(path, data) if layout == "karpathy" else _parse_coco(path, data)), 0
