"""Captions of real photos from outside Flickr8k's world, scored against hand-written labels.

    python bench/outside_photos.py [--labels bench/outside_photos.json] [--show] [--no-guidance]

The photos ship in packages (scikit-image, scikit-learn, matplotlib; Debian's opencv-doc examples). Prints
two rates for the built-in model with the default search: how often the first caption names the photo's main
object (any of its label words), and how often it speaks of people in a photo with nobody in it. With
--compare, both the guided search and --no-guidance (the search before grounding), side by side.
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TORCH_HOME", str(Path(__file__).resolve().parents[2] / "shared" / "torch_home"))

# Scored independently of the tool's own list: any word that means a person (or refers to one).
PEOPLE = set("""man men woman women person people boy boys girl girls child children kid kids baby babies
toddler lady ladies guy guys player players crowd he she his her him someone somebody couple family team
skier skiers surfer surfers biker bikers rider riders climber swimmer swimmers worker workers teenager
teenagers adult adults gentleman crowd spectators dancer dancers performer musician audience tourist
tourists friends soldier soldiers cyclist cyclists athlete runner runners hiker hikers snowboarder
skateboarder""".split())


def package_path(spec):
    """'skimage:chelsea.png' -> the file in that package's bundled data."""
    where, name = spec.split(":", 1)
    if where == "skimage":
        import skimage.data
        return Path(skimage.data.__file__).parent / name
    if where == "sklearn":
        import sklearn.datasets
        return Path(sklearn.datasets.__file__).parent / "images" / name
    if where == "matplotlib":
        import matplotlib
        return Path(matplotlib.get_data_path()) / "sample_data" / name
    if where == "opencv":
        return Path("/usr/share/doc/opencv-doc/examples/data") / name
    return Path(spec)


def load_photos(labels):
    """(label entry, path) of each labelled photo that is on this machine; says which are missing."""
    out, missing = [], []
    for entry in json.loads(Path(labels).read_text())["photos"]:
        try:
            path = package_path(entry["file"])
        except ImportError:
            path = None
        (out.append((entry, path)) if path and path.exists() else missing.append(entry["file"]))
    if missing:
        print(f"missing ({len(missing)}): {', '.join(missing)}", file=sys.stderr)
    return out


def words(text):
    return re.findall(r"[a-z]+", text.lower())


def score(photos, captions):
    """(rate naming the main object, rate of people words among the photos with nobody, counts)."""
    named = sum(any(w in e["objects"] for w in words(c)) for (e, _), c in zip(photos, captions))
    empty = [c for (e, _), c in zip(photos, captions) if not e["people"]]
    invented = sum(any(w in PEOPLE for w in words(c)) for c in empty)
    return named / len(photos), invented / max(1, len(empty)), (named, len(photos), invented, len(empty))


def run(captioner, photos, cfg):
    from captioning.features.images import load_image
    images = [load_image(p) for _, p in photos]
    results = captioner.caption_pil(images, cfg, names=[str(p) for _, p in photos])
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", default=str(Path(__file__).with_suffix(".json")))
    p.add_argument("--model", default="default")
    p.add_argument("--show", action="store_true", help="print each photo's caption")
    p.add_argument("--compare", action="store_true", help="also the search without guidance")
    args = p.parse_args()
    from captioning.inference.captioner import Captioner
    from captioning.config import SearchConfig
    photos = load_photos(args.labels)
    captioner = Captioner.load(args.model, device="cpu")
    runs = [("guided (default)", SearchConfig())]
    if args.compare and "guidance" in SearchConfig.__dataclass_fields__:
        runs.append(("--no-guidance", SearchConfig(guidance=False)))
    for name, cfg in runs:
        results = run(captioner, photos, cfg)
        captions = [r.captions[0] for r in results]
        named, people, (n, total, inv, empty) = score(photos, captions)
        print(f"{name}: names the main object {n}/{total} = {named:.2f}; people where nobody is {inv}/{empty} "
              f"= {people:.2f}")
        if args.show:
            for (e, _), r in zip(photos, results):
                extra = getattr(r, "tags", None)
                tags = ", ".join(f"{t['word']} {t['score']:.2f}" for t in extra) if extra else ""
                conf = getattr(r, "confidence", None)
                print(f"  {e['file']:32s} {r.captions[0]}" + (f"  [{tags}]" if tags else "")
                      + (f" conf {conf:.2f}" if conf is not None else ""))


if __name__ == "__main__":
    main()
