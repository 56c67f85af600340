"""The web dashboard: caption (and segment) photos in the browser, on the checkpoints the menu trains.

    pip install -r requirements-dashboard.txt
    python image_captioning.py dashboard [--workdir DIR] [--model PATH] [--image PATH] [--port N] [--host ADDRESS]
                                         [--allow-path DIR ...] [--password [TEXT]]
    streamlit run captioning/dashboard.py -- [--workdir DIR] [--model PATH] [--image PATH] [--allow-path DIR]

Streamlit reruns this whole script on every click. The models therefore live in st.cache_resource (loaded
once per server, not per rerun), and each photo's caption, PNGs and segmentation are kept in the session
so that moving a slider recomputes only what the slider changed. Streamlit is an optional dependency:
nothing else in the package imports this module.

Who may read what is decided here, from the address the server really listens on (Streamlit's
server.address, which `streamlit run` without it leaves at every interface): beyond this computer the
path box exists only for the --allow-path folders, and a password in IMAGE_CAPTIONING_DASHBOARD_PASSWORD
is asked for before anything else is drawn.
"""
import argparse
import csv
import dataclasses
import functools
import hashlib
import hmac
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

# `streamlit run` puts this file's folder on sys.path, where our datasets.py, utils.py, models.py... would
# shadow installed packages of the same names. Import the package from the repository root instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import streamlit as st  # noqa: E402

from captioning.cli import PASSWORD_ENV, is_loopback  # noqa: E402
from captioning.utils import CaptioningError, clean_user_path, collect_images, failure_message  # noqa: E402

MAX_PHOTOS = 50        # a folder of thousands would make a page no browser can show
DISPLAY_SIDE = 1024    # photos are shown, drawn on and segmented at most this large (captioned at full size)


@dataclasses.dataclass
class Photo:
    """One photo to show. Only a small copy stays in memory between reruns; the full-size image is decoded
    again when a caption has to be computed (the encoder should see what the CLI's encoder sees)."""
    name: str          # as the user knows it: the upload's file name or the path typed
    key: str           # the same key, the same photo: its results are reused
    source: object     # the uploaded bytes, or a Path
    small: object = None   # RGB PIL image at most DISPLAY_SIDE pixels wide and high

    def full(self):
        from captioning.encoders import load_image
        return load_upload(self.name, self.source) if isinstance(self.source, bytes) else load_image(self.source)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dashboard.py", description="The image-captioning web dashboard.")
    p.add_argument("--workdir", default=".", help="where models/ lives (default: current folder)")
    p.add_argument("--model", help="checkpoint path or 'default' (default: models/best.pt in the workdir)")
    p.add_argument("--image", default="", help="a photo or folder to show at start, without uploading")
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="a folder the path box may read (repeatable); without one it reads anything, on loopback")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--no-segmentation", action="store_true", help="start with the segmentation view off")
    return p.parse_known_args(argv)


def md(text):
    """Text shown through markdown exactly as it is (a file name may hold * or _)."""
    return "".join("\\" + c if c in "\\`*_{}[]<>()#+-.!|~$" else c for c in str(text))


# --- inputs ------------------------------------------------------------------------------------------

def load_upload(name, data):
    """An uploaded file's bytes → RGB PIL image through the CLI's own loader and checks, so that an upload
    that is not an image, is truncated or is too large gets the CLI's sentence, naming the upload."""
    from captioning.encoders import load_image
    safe = Path(str(name)).name[-120:] or "upload"   # a name never chooses a folder; long names are cut
    with tempfile.TemporaryDirectory(prefix="captioning-upload-") as tmp:
        path = Path(tmp) / safe
        path.write_bytes(data)
        try:
            return load_image(path)
        except CaptioningError as e:
            raise CaptioningError(str(e).replace(str(path), safe)) from None


def readable_paths(typed, allowed):
    """A typed file/folder path → its image paths, every one inside an `allowed` folder once `..`, symlinks
    and `~` are resolved (no `allowed`: anything). The typed path is checked before it is looked at (so a
    refusal does not tell whether something exists out there), then each photo: a folder inside may hold a
    symlink to a photo outside."""
    typed = clean_user_path(typed)
    if not allowed:
        return collect_images([typed])
    roots = [Path(a).expanduser().resolve() for a in allowed]

    def inside(path):
        if not any(path.resolve().is_relative_to(root) for root in roots):
            raise CaptioningError(f"{path} is outside the folders this dashboard may read "
                                  f"({', '.join(map(str, roots))}).")
        return path.resolve()
    inside(typed)
    return [inside(p) for p in collect_images([typed])]


def gather_photos(uploads, typed, remember=lambda key, compute: compute(), allowed=()):
    """Uploaded files and a typed file/folder path → (photos, one error sentence per bad input).
    `remember` keeps each readable photo's small copy across reruns (the page passes its memo)."""
    candidates, errors = [], []
    for up in uploads or []:
        data = up.getvalue()
        candidates.append(Photo(up.name, hashlib.sha1(data).hexdigest(), data))
    if typed.strip():
        try:
            for path in readable_paths(typed, allowed):
                stat = path.stat()   # a file changed on disk is read again
                candidates.append(Photo(str(path), f"{path}:{stat.st_mtime_ns}:{stat.st_size}", path))
        except (CaptioningError, OSError) as e:
            errors.append(failure_message(e))
    photos = []
    for photo in candidates[:MAX_PHOTOS]:
        try:
            photo.small = remember(("photo", photo.key), lambda: display_copy(photo.full()))
            photos.append(photo)
        except (CaptioningError, OSError) as e:
            errors.append(failure_message(e))
    if len(candidates) > MAX_PHOTOS:
        errors.append(f"Showing the first {MAX_PHOTOS} of {len(candidates)} photos.")
    return photos, errors


# --- outputs -------------------------------------------------------------------------------------------

def png_name(name):
    return f"{Path(name).stem or 'photo'}_captioned.png"


def results_json(results):
    """All results as the CLI's `caption --json` list; "png" is the annotated file's download name."""
    rows = [{**r.to_json(), "png": png_name(r.image)} for r in results]
    return json.dumps(rows, indent=2, ensure_ascii=False)


def results_csv(results):
    """One row per caption: image, rank (1 = best), caption, score, the photo's tags ("; ") and confidence."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["image", "rank", "caption", "score", "tags", "confidence"])
    for r in results:
        conf = "" if r.confidence is None else f"{r.confidence:.4f}"
        for rank, (caption, score) in enumerate(zip(r.captions, r.scores), 1):
            writer.writerow([r.image, rank, caption, f"{score:.4f}", "; ".join(t["word"] for t in r.tags), conf])
    return out.getvalue()


def tags_text(result):
    """The line under a photo's caption: its keywords with their scores, and the caption's confidence."""
    from captioning.render import tag_line
    parts = [f"tags: {tag_line(result.tags)}"] if result.tags else []
    parts += [] if result.confidence is None else [f"confidence {result.confidence:.2f}"]
    return " — ".join(parts)


def png_bytes(draw, *args):
    """Run one of render.py's save_* functions into memory: it writes a file, the browser wants bytes."""
    with tempfile.TemporaryDirectory(prefix="captioning-png-") as tmp:
        return draw(*args, Path(tmp) / "picture.png").read_bytes()


def display_copy(image):
    small = image.copy()
    small.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
    return small


# --- models, once per server ---------------------------------------------------------------------------

def checkpoint_choices(workdir, model):
    """(label, path) of the checkpoints the sidebar offers; the first is the one `caption` would use."""
    from captioning.checkpoint import BUILTIN, find_model, models_dir
    first = find_model(workdir, model)
    found = [first] + sorted(p for p in models_dir(workdir).glob("*.pt") if p != first)
    if BUILTIN.exists() and BUILTIN not in found:
        found.append(BUILTIN)
    def label(p):
        if p == BUILTIN:
            return "built-in model"
        try:
            return str(p.resolve().relative_to(Path(workdir).resolve()))   # "models/best.pt" fits the sidebar
        except ValueError:
            return str(p)
    return [(label(p), p) for p in found]


@st.cache_resource(show_spinner="Loading the caption model...")
def load_captioner(path, mtime, device):
    """`mtime` is part of the cache key: a checkpoint retrained in the meantime is loaded afresh."""
    from captioning.captioner import Captioner
    from captioning.checkpoint import load_checkpoint
    captioner = Captioner(load_checkpoint(path), device, source=Path(path))
    captioner.encoder()  # build the CNN now, once, rather than at the first photo of every session
    return captioner


@st.cache_resource(show_spinner="Loading the segmentation model...")
def load_segmentation(device):
    """(Segmenter, None), or (None, the sentence saying why not): a failure is cached too, so an offline
    machine does not retry the download on every click."""
    from captioning.segment import load_segmenter
    try:
        return load_segmenter(device=device), None
    except CaptioningError as e:
        return None, str(e)


def memo(key, compute):
    """Per-session results by key: reruns (every click) reuse them; the oldest go beyond 300 entries."""
    store = st.session_state.setdefault("memo", {})
    if key not in store:
        if len(store) >= 300:
            store.pop(next(iter(store)))
        store[key] = compute()
    return store[key]


# --- the page ----------------------------------------------------------------------------------------------

def sidebar(args):
    with st.sidebar:
        st.header("Settings")
        try:
            choices = checkpoint_choices(args.workdir, args.model)
        except CaptioningError as e:
            st.error(str(e))
            st.stop()
        label = st.selectbox("Checkpoint", [c[0] for c in choices])
        path = dict(choices)[label]
        beam = st.slider("Beam size", 1, 10, 3, help="1 is greedy search; wider beams find likelier captions")
        count = st.slider("Captions per photo", 1, 5, 3, help="the N best distinct captions, with their scores")
        attention = st.checkbox("Attention maps", value=True, help="where the model looked, word by word")
        segmentation = st.checkbox("Segmentation", value=not args.no_segmentation,
                                   help="DeepLabV3 (MobileNetV3) over the 20 PASCAL VOC classes")
    return path, beam, count, attention, segmentation


def decoder_description(name):
    """A decoder as the model card names it: its registry name and the start of its class docstring, up to
    the first colon or full stop that ends a sentence (the paper and the idea: "Xu et al. 2015, soft
    attention"), so a newly registered decoder describes itself."""
    from captioning.models import DECODERS
    doc = " ".join((getattr(DECODERS.get(name), "__doc__", None) or "").split("\n\n")[0].split())
    summary = re.split(r":|\.\s+(?=[A-Z])", doc, maxsplit=1)[0].strip().rstrip(".,;")
    return f"{name} ({summary})" if summary else name


def model_card(captioner, path):
    from captioning.checkpoint import describe, split_scores, summarize
    from captioning.models import DECODERS
    from captioning.render import save_training_curves
    ckpt, cfg = captioner.ckpt, captioner.config
    summary = summarize(ckpt)
    st.markdown(md(describe(summary)))
    attends = getattr(DECODERS.get(cfg.decoder), "uses_grid", False)   # the attention decoders
    sizes = f"embedding {cfg.embed_dim}, hidden {cfg.hidden_dim}" + (f", attention {cfg.attention_dim}" if attends
                                                                     else "")
    facts = {"file": str(path), "encoder": f"{captioner.spec.name} ({captioner.spec.weights or 'random'} weights)",
             "decoder": decoder_description(cfg.decoder), "sizes": sizes,
             "vocabulary": f"{len(captioner.vocab):,} words",
             "epochs trained": str(summary["epoch"])}
    st.table({"": list(facts), "value": list(facts.values())})
    history = ckpt.get("history") or []
    kept = [h for h in history if h.get("best")][-1:] or history[-1:]
    if kept:
        st.markdown(f"**Dev scores** (epoch {kept[0].get('epoch')}, the one kept)")
        score_table({k: v for k, v in kept[0].items() if k in ("BLEU-4", "CIDEr-D", "val_loss")})
        st.image(memo(("curves", str(path), summary["epoch"]), lambda: png_bytes(save_training_curves, history)),
                 caption="training history")
    found = [(title, *split_scores(ckpt, path, split)) for split, title in (("val", "Validation split"),
                                                                          ("test", "Test split"))]
    for title, scores, where in found:
        if scores:
            st.markdown(f"**{title} scores** ({md(where)})")
            score_table(scores)
    if not any(scores for _, scores, _ in found):
        st.caption("No test scores yet: run `python image_captioning.py evaluate --data DIR` to add them.")


def score_table(scores):
    # As text: a metric that could not run (METEOR without Java) is None, which a number column shows as NaN.
    st.table({"metric": list(scores), "score": [f"{v:.4f}" if isinstance(v, (int, float)) else "skipped"
                                                for v in scores.values()]})


def show_segmentation(segmenter, photo):
    from captioning.segment import legend, overlay
    def compute():
        labels = segmenter.labels(photo.small)
        return overlay(photo.small, labels), legend(labels)
    picture, entries = memo(("segment", photo.key), compute)
    st.image(picture, caption="segmentation")
    swatch = '<span style="display:inline-block;width:0.9em;height:0.9em;background:{};border:1px solid #888">'
    lines = [f"{swatch.format(e.colour)}</span> {e.name} {e.share:.0%}" if e.share >= 0.005 else
             f"{swatch.format(e.colour)}</span> {e.name} <1%" for e in entries]
    st.markdown("<br>".join(lines) if lines else "No person, animal, vehicle or furniture found.",
                unsafe_allow_html=True)


def show_photo(index, photo, result, model_key, attention, segmenter):
    from captioning.render import save_attention_map, save_captioned_image
    with st.container(border=True):
        st.markdown(f"#### {md(Path(photo.name).name)}")
        cols = st.columns([1, 1.3, 1] if segmenter else [1, 1.3])
        cols[0].image(photo.small)
        with cols[1]:
            st.markdown(f"**{md(result.captions[0])}**")
            if result.tags or result.confidence is not None:
                st.caption(md(tags_text(result)))
            # A table rather than a dataframe: it wraps long captions instead of cutting off the scores.
            st.table({"caption": result.captions, "score": [f"{s:.3f}" for s in result.scores]})
            png = memo(("png", model_key, photo.key, tuple(result.captions), tags_text(result)),
                       lambda: png_bytes(functools.partial(save_captioned_image, tags=result.tags), photo.small,
                                         result.captions))
            st.download_button("Annotated PNG", png, file_name=png_name(photo.name), mime="image/png",
                               key=f"png-{index}", on_click="ignore")
        if segmenter:
            with cols[2]:
                show_segmentation(segmenter, photo)
        if attention and result.alphas is not None:
            with st.expander("Attention maps: where the model looked for each word"):
                st.image(memo(("attention", model_key, photo.key, tuple(result.words)), lambda: png_bytes(
                    save_attention_map, photo.small, result.words, result.alphas)))


def caption_page(captioner, model_key, settings, args):
    from captioning.search import SearchConfig
    _, beam, count, attention, segmentation = settings
    uploads = st.file_uploader("Photos", accept_multiple_files=True,
                               help="JPEG, PNG, GIF, WebP, BMP or TIFF; several at once are fine")
    typed = ""
    if path_box_allowed(args):   # absent, not hidden: a crafted request has no widget to fill in
        typed = st.text_input("...or a photo or folder on this computer", value=args.image, key="path")
    photos, errors = gather_photos(uploads, typed, memo, args.allow_path)
    for e in errors:
        st.error(e)
    if not photos:
        st.info("Upload photos, or type the path of a photo or a folder, to caption them." if
                path_box_allowed(args) else "Upload photos to caption them.")
        return
    if attention and not captioner.decoder.uses_grid:
        st.caption("This model has no attention (lstm decoder), so there are no attention maps.")
    segmenter = None
    if segmentation:
        segmenter, why_not = load_segmentation(str(captioner.device))
        if why_not:
            st.info(why_not)
    cfg = SearchConfig(beam_size=beam, num_captions=count)
    results = []
    for i, photo in enumerate(photos):
        try:
            result = memo(("caption", model_key, photo.key, beam, count),
                          lambda: captioner.caption_pil([photo.full()], cfg, keep_alphas=True)[0])
            result = dataclasses.replace(result, image=photo.name)   # the same photo may come under two names
            show_photo(i, photo, result, model_key, attention, segmenter)
            results.append(result)
        except Exception as e:  # one photo failing (e.g. out of memory) must not cost the others
            st.error(f"{photo.name}: {failure_message(e)}")
    if results:
        left, right = st.columns(2)
        left.download_button("All results (JSON)", results_json(results), file_name="captions.json",
                             mime="application/json", on_click="ignore")
        right.download_button("All results (CSV)", results_csv(results), file_name="captions.csv",
                              mime="text/csv", on_click="ignore")


def path_box_allowed(args):
    """The path box reads this computer's files: offered on loopback, and beyond it only for --allow-path.
    An unset server.address is Streamlit's every-interface default."""
    return bool(args.allow_path) or is_loopback(st.get_option("server.address") or "")


def ask_password():
    """Stop the page here until this session has typed the password (when one is set)."""
    wanted = os.environ.get(PASSWORD_ENV, "")
    if not wanted or st.session_state.get("unlocked"):   # "unlocked" is no widget's key: no client can set it
        return
    typed = st.text_input("Password", type="password")
    if typed and hmac.compare_digest(typed.encode(), wanted.encode()):
        st.session_state.unlocked = True
        st.rerun()
    if typed:
        time.sleep(1)   # slows guessing down to one try a second per session
        st.error("Wrong password.")
    st.stop()


def main():
    args, unknown = parse_args(sys.argv[1:])
    st.set_page_config(page_title="image-captioning", layout="wide")
    st.title("image-captioning")
    ask_password()
    if unknown:
        st.warning(f"Ignored unknown options: {' '.join(unknown)}")
    settings = sidebar(args)
    path = settings[0]
    try:
        from captioning.features import pick_device
        device = str(pick_device(args.device))
        captioner = load_captioner(str(path), path.stat().st_mtime if path.exists() else 0, device)
    except Exception as e:
        st.error(failure_message(e))
        st.stop()
    model_key = (str(path), path.stat().st_mtime)
    photos_tab, card_tab = st.tabs(["Caption photos", "Model card"])
    with card_tab:
        model_card(captioner, path)
    with photos_tab:
        caption_page(captioner, model_key, settings, args)


if __name__ == "__main__":
    main()
