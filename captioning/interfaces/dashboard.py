"""The web dashboard: caption (and segment) photos in the browser, on the checkpoints the menu trains.

    pip install -r requirements-dashboard.txt
    python image_captioning.py dashboard [--workdir DIR] [--model PATH] [--image PATH] [--port N] [--host ADDRESS]
                                         [--allow-path DIR ...] [--allow-host NAME ...] [--password [TEXT]]
    streamlit run captioning/interfaces/dashboard.py -- [--workdir DIR] [--model PATH] [--image PATH] [--allow-path DIR]

Streamlit reruns this whole script on every click. The models therefore live in this module's globals
(loaded once per server, not per rerun), and each photo's caption, PNGs and segmentation are kept in the session
so that moving a slider recomputes only what the slider changed. Streamlit is an optional dependency:
nothing else in the package imports this module.

Who may read what is decided here, from the address the server really listens on (Streamlit's
server.address, which `streamlit run` without it leaves at every interface): beyond this computer the
path box exists only for the --allow-path folders, and a password in IMAGE_CAPTIONING_DASHBOARD_PASSWORD
is asked for before anything else is drawn or uploaded. README.md's "Security" section says what holds.
"""
import argparse
import collections
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
import threading
import time
from pathlib import Path
from stat import S_ISREG

# `streamlit run` runs this file as a script, in one thread per session, with the file's folder on sys.path.
# The package must be importable from the repository root: `dashboard` puts it on PYTHONPATH, and a plain
# `streamlit run captioning/interfaces/dashboard.py` gets it appended here once (atomic; the test is false ever after).
# Nothing here edits sys.path on each rerun: a rerun's edit raced other sessions' imports and left them all
# failing ("No module named 'ctypes'"). Our modules are only ever imported as captioning.X, so the folder
# on sys.path shadows nothing we import.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

import streamlit as st  # noqa: E402

from captioning.interfaces.launcher import PASSWORD_ENV, UPLOAD_MB, is_loopback  # noqa: E402
from captioning.utils import CaptioningError, clean_user_path, collect_images, failure_message  # noqa: E402

MAX_PHOTOS = 50        # a folder of thousands would make a page no browser can show
MAX_UPLOADS = MAX_PHOTOS   # files one session may hold on the server at once
MAX_FILE_MB = UPLOAD_MB   # the largest upload, and photo read by path (Streamlit is given it too)
DISPLAY_SIDE = 1024    # photos are shown, drawn on and segmented at most this large (captioned at full size)
PASSWORD_TRIES = 10    # wrong passwords the whole server takes per PASSWORD_WINDOW seconds, all sessions together
PASSWORD_WINDOW = 60

# What the whole server shares lives in this module's globals (the page runs from the imported module, see
# the end of the file), not in st.cache_resource: any visitor, password or not, can send Streamlit's "clear
# cache" message, which would make the next visitor reload the model and forget the wrong-password count.
_LOCK = threading.Lock()
_MODELS = {}            # (kind, path, mtime, device) → a loaded model; the newest few are kept
_UNLOCKED = set()       # ids of the sessions that typed the password: only they may upload
_FAILURES = collections.deque()   # monotonic times of the wrong passwords within PASSWORD_WINDOW
_GUARDED = False        # the upload store has been told whose uploads to refuse


@dataclasses.dataclass
class Photo:
    """One photo to show. Only a small copy stays in memory between reruns; the full-size image is decoded
    again when a caption has to be computed (the encoder should see what the CLI's encoder sees)."""
    name: str          # as the user knows it: the upload's file name or the path typed
    key: str           # the same key, the same photo: its results are reused
    source: object     # the uploaded bytes, or a Path
    small: object = None   # RGB PIL image at most DISPLAY_SIDE pixels wide and high
    roots: tuple = ()  # a photo read by path under --allow-path: these folders, checked again once it is open

    def full(self):
        from captioning.features.images import load_image
        if isinstance(self.source, bytes):
            return load_upload(self.name, self.source)
        if self.roots:
            return load_upload(self.name, read_inside(self.source, self.roots), shown=str(self.source))
        return load_image(self.source)


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

def printable(name):
    """A file name as the page shows it: NUL and other control characters (which a client may send in an
    upload's name) as `?`, so that no name can break a path, a message or a line."""
    return "".join(c if c.isprintable() else "?" for c in str(name))


def load_upload(name, data, shown=None):
    """An uploaded file's bytes → RGB PIL image through the CLI's own loader and checks, so that an upload
    that is not an image, is truncated or is too large gets the CLI's sentence, naming the upload (or
    `shown`: the path of a photo read by path)."""
    from captioning.features.images import load_image
    safe = printable(Path(str(name)).name)[-120:].lstrip(".") or "upload"   # a name never chooses a folder
    with tempfile.TemporaryDirectory(prefix="captioning-upload-") as tmp:
        path = Path(tmp) / safe
        path.write_bytes(data)
        try:
            return load_image(path)
        except CaptioningError as e:
            raise CaptioningError(str(e).replace(str(path), shown or safe)) from None


def allowed_roots(allowed):
    return [Path(a).expanduser().resolve() for a in allowed]


def check_inside(path, roots, shown=None):
    """`path` resolved (`..`, symlinks), or the one-line refusal when it is outside every root."""
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(root) for root in roots):
        raise CaptioningError(f"{shown or path} is outside the folders this dashboard may read "
                              f"({', '.join(map(str, roots))}).")
    return real


def readable_paths(typed, allowed):
    """A typed file/folder path → its image paths, every one inside an `allowed` folder once `..`, symlinks
    and `~` are resolved (no `allowed`: anything). The typed path is resolved and checked before it is
    looked at, and then listed as resolved, so that nothing outside is ever touched: the answer cannot tell
    whether something out there exists (`A/../B/x/../../A/a.jpg` would, listed as typed). Then each
    photo is checked: a folder inside may hold a symlink to a photo outside."""
    if "\0" in str(typed):
        raise CaptioningError(f"The path has a NUL character in it: {printable(str(typed).strip())}")
    typed = clean_user_path(typed)
    if not allowed:
        return collect_images([typed])
    roots = allowed_roots(allowed)
    real = check_inside(typed, roots)
    return [check_inside(p, roots) for p in collect_images([real])]


def read_inside(path, roots):
    """The bytes of the photo at `path`, checked against `roots` once it is open: a file swapped for a
    symlink between the check and the open (by someone who can write in an allowed folder) is refused."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))   # a FIFO must not hang the page
    with os.fdopen(fd, "rb") as f:
        opened = f"/proc/self/fd/{fd}"
        if os.path.exists(opened):   # Linux names the file the descriptor really opened
            check_inside(os.readlink(opened), roots, shown=path)
        elif os.fstat(fd)[1:3] != check_inside(path, roots).stat()[1:3]:   # elsewhere: same inode and device
            raise CaptioningError(f"{path} changed while it was read; try again.")
        if not S_ISREG(os.fstat(fd).st_mode):
            raise CaptioningError(f"Not a regular file: {path}")
        if os.fstat(fd).st_size > MAX_FILE_MB << 20:
            raise CaptioningError(f"{path} is larger than {MAX_FILE_MB} MB, the most this dashboard reads.")
        return f.read()


def gather_photos(uploads, typed, remember=lambda key, compute: compute(), allowed=()):
    """Uploaded files and a typed file/folder path → (photos, one error sentence per bad input).
    `remember` keeps each readable photo's small copy across reruns (the page passes its memo)."""
    candidates, errors = [], []
    for up in uploads or []:
        data = up.getvalue()
        candidates.append(Photo(printable(up.name), hashlib.sha1(data).hexdigest(), data))
    if typed.strip():
        try:
            roots = tuple(allowed_roots(allowed))
            for path in readable_paths(typed, allowed):
                stat = path.stat()   # a file changed on disk is read again
                candidates.append(Photo(str(path), f"{path}:{stat.st_mtime_ns}:{stat.st_size}", path, roots=roots))
        except (CaptioningError, OSError, ValueError) as e:
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
    from captioning.results.render import tag_line
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
    from captioning.training.checkpoint import BUILTIN, find_model, models_dir
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


def shared(key, load, spinner):
    """The server's one copy of a model (loaded by the first session that needs it; the others wait for
    it). A failure is not kept: the next session tries again. The newest 4 stay."""
    with _LOCK:
        if key not in _MODELS:
            with st.spinner(spinner):
                _MODELS[key] = load()
            while len(_MODELS) > 4:
                _MODELS.pop(next(iter(_MODELS)))
        return _MODELS[key]


def forget_models():
    with _LOCK:
        _MODELS.clear()


def load_captioner(path, mtime, device):
    """`mtime` is part of the key: a checkpoint retrained in the meantime is loaded afresh."""
    def load():
        from captioning.inference.captioner import Captioner
        from captioning.training.checkpoint import load_checkpoint
        captioner = Captioner(load_checkpoint(path), device, source=Path(path))
        captioner.encoder()  # build the CNN now, once, rather than at the first photo of every session
        return captioner
    return shared(("captioner", path, mtime, device), load, "Loading the caption model...")


def load_segmentation(device):
    """(Segmenter, None), or (None, the sentence saying why not): a failure is kept too, so an offline
    machine does not retry the download on every click."""
    def load():
        from captioning.features.segment import load_segmenter
        try:
            return load_segmenter(device=device), None
        except CaptioningError as e:
            return None, str(e)
    return shared(("segmentation", device), load, "Loading the segmentation model...")


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
    from captioning.models.decoders import DECODERS
    doc = " ".join((getattr(DECODERS.get(name), "__doc__", None) or "").split("\n\n")[0].split())
    summary = re.split(r":|\.\s+(?=[A-Z])", doc, maxsplit=1)[0].strip().rstrip(".,;")
    return f"{name} ({summary})" if summary else name


def model_card(captioner, path):
    from captioning.training.checkpoint import BUILTIN, describe, split_scores, summarize
    from captioning.models.decoders import DECODERS
    from captioning.results.render import save_training_curves
    ckpt, cfg = captioner.ckpt, captioner.config
    summary = summarize(ckpt)
    st.markdown(md(describe(summary)))
    attends = getattr(DECODERS.get(cfg.decoder), "has_attention", False)   # the attention decoders
    sizes = f"embedding {cfg.embed_dim}, hidden {cfg.hidden_dim}" + (f", attention {cfg.attention_dim}" if attends
                                                                     else "")
    facts = {"file": "built-in model" if path == BUILTIN else str(path),   # not where the package is installed
             "encoder": f"{captioner.spec.name} ({captioner.spec.weights or 'random'} weights)",
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
    from captioning.features.segment import legend, overlay
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
    from captioning.results.render import save_attention_map, save_captioned_image
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
    from captioning.config import SearchConfig
    _, beam, count, attention, segmentation = settings
    uploads = st.file_uploader("Photos", accept_multiple_files=True, max_upload_size=MAX_FILE_MB,
                               help=f"JPEG, PNG, GIF, WebP, BMP or TIFF; up to {MAX_UPLOADS} at once, "
                                    f"{MAX_FILE_MB} MB each")
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
    if attention and not captioner.decoder.has_attention:
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


def session_id():
    from streamlit.runtime.scriptrunner import get_script_run_ctx
    ctx = get_script_run_ctx()
    return ctx.session_id if ctx else ""


def too_many_guesses(now):
    """True while the server has had PASSWORD_TRIES wrong passwords within PASSWORD_WINDOW seconds."""
    with _LOCK:
        while _FAILURES and now - _FAILURES[0] > PASSWORD_WINDOW:
            _FAILURES.popleft()
        return len(_FAILURES) >= PASSWORD_TRIES


def wrong_guess(now):
    with _LOCK:
        _FAILURES.append(now)
        count = len(_FAILURES)
    who = getattr(st.context, "ip_address", None) or "this computer"   # Streamlit gives None for loopback
    print(f"dashboard: wrong password from {who} (session {session_id()[:8]}; {count} in the last "
          f"{PASSWORD_WINDOW} s)", file=sys.stderr, flush=True)


def ask_password():
    """Stop the page here until this session has typed the password (when one is set). Wrong passwords
    are limited for the whole server, not per session (a guesser can open many), and logged."""
    wanted = os.environ.get(PASSWORD_ENV, "")
    if not wanted or st.session_state.get("unlocked"):   # "unlocked" is no widget's key: no client can set it
        return
    typed = st.text_input("Password", type="password")
    if typed:
        tried = hashlib.sha256(typed.encode()).hexdigest()   # a rerun with the same text is not a new guess
        if too_many_guesses(time.monotonic()):
            st.error(f"Too many wrong passwords; this dashboard takes no more for up to {PASSWORD_WINDOW} "
                     "seconds.")
            st.stop()
        if hmac.compare_digest(typed.encode(), wanted.encode()):
            st.session_state.unlocked = True
            with _LOCK:
                _UNLOCKED.add(session_id())
            st.rerun()
        if st.session_state.get("tried") != tried:
            st.session_state.tried = tried
            wrong_guess(time.monotonic())
            time.sleep(1)   # and one try a second per session
        st.error("Wrong password.")
    st.stop()


def guard_uploads():
    """Streamlit keeps any file a session sends to its upload address, whether or not the page shows an
    uploader, up to server.maxUploadSize each and as many as are sent. Once per server, its store is told
    to refuse (403) the uploads of sessions that have not typed the password, and (413) a session's files
    beyond MAX_UPLOADS."""
    global _GUARDED
    with _LOCK:
        if _GUARDED:
            return
        _GUARDED = True
    try:
        from streamlit import runtime
        store = runtime.get_instance().uploaded_file_mgr
    except Exception:   # no server (Streamlit's AppTest): no upload address either
        return
    try:
        from starlette.exceptions import HTTPException as Refused
    except ImportError:   # another web server: the upload fails all the same
        def Refused(status_code, detail):
            return PermissionError(detail)
    add_file = store.add_file

    def guarded(session_id, file):
        with _LOCK:
            unlocked = session_id in _UNLOCKED
        if os.environ.get(PASSWORD_ENV) and not unlocked:
            raise Refused(status_code=403, detail="Type the password first.")
        held = getattr(store, "file_storage", {}).get(session_id, {})
        if file.file_id not in held and len(held) >= MAX_UPLOADS:
            raise Refused(status_code=413, detail=f"At most {MAX_UPLOADS} files at a time.")
        return add_file(session_id, file)
    store.add_file = guarded


def main():
    args, unknown = parse_args(sys.argv[1:])
    guard_uploads()
    hide_error_details()
    st.set_page_config(page_title="image-captioning", layout="wide")
    st.title("image-captioning")
    ask_password()
    if unknown:
        st.warning(f"Ignored unknown options: {' '.join(unknown)}")
    settings = sidebar(args)
    path = settings[0]
    try:
        from captioning.features.extract import pick_device
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


def hide_error_details():
    """No traceback (with this computer's paths) on the page, even under a plain `streamlit run`: an
    unexpected error shows Streamlit's generic sentence, and the details go to the server's log."""
    from streamlit import config
    if config.get_option("client.showErrorDetails") not in ("none", False):
        try:
            st.set_option("client.showErrorDetails", "none")
        except Exception:   # a Streamlit that does not allow it at run time: `dashboard` sets it at start
            pass


if __name__ == "__main__":
    # Streamlit runs this file afresh as __main__ on every rerun; the page runs from the imported module,
    # whose globals (the models, the password count) last as long as the server.
    from captioning.interfaces import dashboard
    dashboard.main()
