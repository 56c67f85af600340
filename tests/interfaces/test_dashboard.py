"""The web dashboard: driven by Streamlit's own AppTest (uploads, captions, errors, caching, model card,
segmentation), its helpers directly, the `dashboard` command and menu option, and the running app in a
real headless Chromium (skipped when `chromium` is not installed)."""
import base64
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image

from captioning.interfaces import cli as cli_module
from captioning.interfaces import launcher
from captioning.interfaces import menu
from captioning.inference.captioner import Captioner
from captioning.training.checkpoint import describe, load_checkpoint, summarize
from captioning.features.images import load_image
from captioning.config import SearchConfig
from captioning.utils import CaptioningError
from tests.helpers import (APP, ROOT, Dashboard, dashboard, expected_captions, shown_photos, texts,
                           wait_for)


def image_captions(at):
    """The captions under every st.image on the page (older AppTests list images as unknown "imgs")."""
    elements = at.image if hasattr(at, "image") else at.get("imgs")
    return [img.caption for e in elements for img in e.proto.imgs]


# ---- AppTest: the app itself --------------------------------------------------------------------------

def test_an_uploaded_photo_gets_its_caption_and_n_best(app, workdir, photos):
    at = app("--workdir", workdir, "--no-segmentation")
    assert texts(at.info) == ["Upload photos, or type the path of a photo or a folder, to caption them."]
    at.file_uploader[0].set_value((photos[0].name, photos[0].read_bytes(), "image/jpeg"))
    at.run()
    assert not at.exception and not at.error
    want = expected_captions(workdir, photos[0])
    assert f"**{want.captions[0]}**" in texts(at.markdown)
    table = at.table[0].value
    assert list(table["caption"]) == want.captions and len(want.captions) == 3
    assert list(table["score"]) == [f"{s:.3f}" for s in want.scores]
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Annotated PNG", "All results (JSON)", "All results (CSV)"]
    # The attention model's per-word maps are there (an expander holding the drawing).
    assert any("Attention maps" in e.label for e in at.expander)


def test_broken_uploads_get_the_cli_messages_and_the_good_photo_is_still_captioned(app, workdir, photos, tmp_path):
    good = photos[0].read_bytes()
    huge = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(huge, "PNG")       # 144 Mpx: over the decompression-bomb limit
    uploads = [("notes.jpg", b"this is not a picture", "image/jpeg"), ("cut.jpg", good[:len(good) // 2], "image/jpeg"),
               ("empty.png", b"", "image/png"), ("huge.png", huge.getvalue(), "image/png"),
               (photos[0].name, good, "image/jpeg")]
    # What the CLI's loader says about the same files on disk, with the path in place of the name.
    cli_messages = []
    for name, data, _ in uploads[:4]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CaptioningError) as err:
            load_image(tmp_path / name)
        cli_messages.append(str(err.value).replace(str(tmp_path / name), name))
    assert cli_messages[0].startswith("Not an image file") and cli_messages[3].startswith("Image is too large")

    at = app("--workdir", workdir, "--no-segmentation")
    at.file_uploader[0].set_value(uploads)
    at.run()
    assert not at.exception
    assert texts(at.error) == cli_messages
    assert f"**{expected_captions(workdir, photos[0]).captions[0]}**" in texts(at.markdown)


def test_a_folder_path_and_a_missing_path(app, workdir, photos, tmp_path):
    folder = tmp_path / "my photos"
    folder.mkdir()
    for p in photos:
        shutil.copy(p, folder / p.name)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    at = app("--workdir", workdir, "--no-segmentation", "--image", folder)   # --image fills the path box
    assert at.text_input[0].value == str(folder)
    assert texts(at.error) == [f"Not an image file (or a format Pillow cannot read): {folder / 'broken.png'}"]
    shown = texts(at.markdown)
    for p in photos:
        assert f"**{expected_captions(workdir, p).captions[0]}**" in shown
    at.text_input[0].set_value(str(tmp_path / "nowhere.jpg"))
    at.run()
    assert texts(at.error) == [f"Image not found: {tmp_path / 'nowhere.jpg'}"]


def test_the_model_loads_once_not_on_every_rerun(app, workdir, photos, monkeypatch):
    import captioning.training.checkpoint
    loads = []
    real = captioning.training.checkpoint.load_checkpoint
    monkeypatch.setattr(captioning.training.checkpoint, "load_checkpoint", lambda *a, **k: loads.append(a) or real(*a, **k))
    at = app("--workdir", workdir, "--no-segmentation", "--image", photos[0])
    at.sidebar.slider[0].set_value(1).run()          # beam size 1: greedy
    at.sidebar.slider[1].set_value(1).run()          # one caption
    assert not at.exception and len(loads) == 1
    greedy = expected_captions(workdir, photos[0], beam=1, count=1)
    assert list(at.table[0].value["caption"]) == greedy.captions


def test_a_missing_model_is_one_line(app, tmp_path):
    at = app("--workdir", tmp_path, "--model", tmp_path / "gone.pt")
    assert texts(at.error) == [f"Model file not found: {tmp_path / 'gone.pt'}"]
    assert not at.file_uploader   # nothing to caption with: the page stops there


def test_the_model_card(app, workdir):
    ckpt = load_checkpoint(workdir / "models" / "best.pt")
    at = app("--workdir", workdir, "--no-segmentation")
    shown = texts(at.markdown)
    assert dashboard().md(describe(summarize(ckpt))) in shown
    assert "training history" in image_captions(at)
    facts = at.table[0].value
    assert "resnet18" in facts.loc[1, "value"] and facts.loc[2, "value"] == "attention (Xu et al. 2015, soft attention)"
    m = ckpt["model_config"]
    assert facts.loc[3, "value"] == f"embedding {m['embed_dim']}, hidden {m['hidden_dim']}, attention {m['attention_dim']}"
    assert facts.loc[4, "value"] == f"{len(ckpt['vocab'])} words"
    kept = [h for h in ckpt["history"] if h["best"]][-1]
    assert dict(zip(at.table[1].value["metric"], at.table[1].value["score"])) == {
        k: f"{kept[k]:.4f}" for k in ("val_loss", "BLEU-4", "CIDEr-D")}
    assert any("No test scores yet" in c for c in texts(at.caption))
    # With an evaluation report beside the model, its test scores are shown.
    report = {"scores": {"BLEU-4": 0.25, "CIDEr-D": 0.5, "METEOR": None}, "captions": []}
    (workdir / "models" / "eval_test.json").write_text(json.dumps(report))
    at = app("--workdir", workdir, "--no-segmentation")
    assert "**Test split scores** (from eval\\_test\\.json)" in texts(at.markdown)
    assert list(at.table[-1].value["score"]) == ["0.2500", "0.5000", "skipped"]


def test_decoder_descriptions_come_from_the_registry():
    from captioning.models.decoders import DECODERS
    described = {name: dashboard().decoder_description(name) for name in DECODERS}
    assert described["lstm"] == "lstm (Vinyals et al. 2015)"
    assert described["updown"] == "updown (Anderson et al. 2018, top-down attention with two LSTMs)"
    for name, text in described.items():   # a new decoder describes itself from its docstring
        assert text.startswith(f"{name} (") and text.endswith(")") and len(text) > len(name) + 10
    assert dashboard().decoder_description("unknown") == "unknown"


def test_segmentation_beside_the_caption(app, workdir, photos, monkeypatch):
    from captioning.features import segment
    real = segment.load_segmenter
    monkeypatch.setattr(segment, "load_segmenter", lambda device="cpu": real(pretrained=False, device=device))
    torch.manual_seed(0)
    at = app("--workdir", workdir, "--image", photos[0])
    assert not at.error and not at.info
    assert image_captions(at).count("segmentation") == 1
    legend = [m for m in at.markdown if m.allow_html]
    assert len(legend) == 1
    assert "<span" in legend[0].value or legend[0].value.startswith("No person")
    assert f"**{expected_captions(workdir, photos[0]).captions[0]}**" in texts(at.markdown)


def test_segmentation_without_weights_is_one_sentence_and_captions_go_on(app, workdir, photos, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    at = app("--workdir", workdir, "--image", photos[0])
    assert len(at.info) == 1 and at.info[0].value.startswith("Segmentation is unavailable because its weights")
    assert ". " not in at.info[0].value and not at.error
    assert f"**{expected_captions(workdir, photos[0]).captions[0]}**" in texts(at.markdown)


# ---- AppTest: who may read what ---------------------------------------------------------------------

def test_beyond_loopback_there_is_no_path_box_and_no_way_to_fill_one(app, workdir, photos):
    at = app("--workdir", workdir, "--no-segmentation", "--image", photos[0], host="0.0.0.0")
    assert not at.text_input and not at.error                    # --image too is ignored: no box to fill
    assert texts(at.info) == ["Upload photos to caption them."]
    # A crafted client can send a value for the box's widget key; with no widget, nothing reads it.
    at.session_state["path"] = str(photos[0])
    at.run()
    assert not at.exception and not shown_photos(at) and texts(at.info) == ["Upload photos to caption them."]
    # Uploads still work.
    at.file_uploader[0].set_value((photos[1].name, photos[1].read_bytes(), "image/jpeg"))
    at.run()
    assert f"**{expected_captions(workdir, photos[1]).captions[0]}**" in texts(at.markdown)


def test_allow_path_reads_inside_and_refuses_dot_dot_symlinks_and_home(app, workdir, photos, tmp_path, monkeypatch):
    inside, outside = tmp_path / "A", tmp_path / "B"
    inside.mkdir()
    outside.mkdir()
    shutil.copy(photos[0], inside / "in.jpg")
    shutil.copy(photos[1], outside / "out.jpg")
    (inside / "link.jpg").symlink_to(outside / "out.jpg")
    (inside / "sub").mkdir()
    (inside / "sub" / "link.jpg").symlink_to(outside / "out.jpg")   # a folder inside, a photo outside
    monkeypatch.setenv("HOME", str(outside))
    at = app("--workdir", workdir, "--no-segmentation", "--allow-path", inside, host="0.0.0.0")

    def refused(typed, shown):
        at.text_input[0].set_value(typed).run()
        assert not at.exception and not shown_photos(at)
        assert texts(at.error) == [f"{shown} is outside the folders this dashboard may read ({inside})."]
    at.text_input[0].set_value(str(inside / "in.jpg")).run()
    assert not at.error and f"**{expected_captions(workdir, photos[0]).captions[0]}**" in texts(at.markdown)
    refused(f"{inside}/../B/out.jpg", f"{inside}/../B/out.jpg")
    refused(str(inside / "link.jpg"), inside / "link.jpg")
    refused(str(inside / "sub"), inside / "sub" / "link.jpg")
    refused("~/out.jpg", outside / "out.jpg")
    refused("~", outside)
    refused(str(outside / "missing.jpg"), outside / "missing.jpg")   # refused, not "not found": no probing


def test_a_password_is_asked_before_anything_is_shown(app, workdir, monkeypatch):
    monkeypatch.setenv("IMAGE_CAPTIONING_DASHBOARD_PASSWORD", "correct horse")
    monkeypatch.setattr(time, "sleep", lambda seconds: None)    # the page's pause after a wrong guess
    at = app("--workdir", workdir, "--no-segmentation")
    assert [t.label for t in at.text_input] == ["Password"]
    assert not at.file_uploader and not at.sidebar.slider and not at.tabs and not at.table and not at.markdown
    at.text_input[0].set_value("wrong").run()
    assert texts(at.error) == ["Wrong password."] and not at.file_uploader
    at.text_input[0].set_value("correct horse").run()
    assert not at.error and len(at.file_uploader) == 1 and at.sidebar.slider
    assert [t.label for t in at.text_input] == ["...or a photo or folder on this computer"]
    at.run()                                                      # and it stays unlocked for this session
    assert len(at.file_uploader) == 1


# ---- the helpers, directly ----------------------------------------------------------------------------

def test_upload_loading_names_the_upload_never_a_temporary_path(photos):
    dash = dashboard()
    image = dash.load_upload(photos[0].name, photos[0].read_bytes())
    assert image.mode == "RGB" and image.size == load_image(photos[0]).size
    for name in ("../../etc/evil.jpg", "", "x" * 300 + ".jpg"):      # a name never picks a folder or breaks
        with pytest.raises(CaptioningError) as err:
            dash.load_upload(name, b"GIF89a broken")
        message = str(err.value)
        assert "captioning-upload-" not in message and "/" not in message.split(": ", 1)[1]
        assert message.startswith("Could not read image") or message.startswith("Not an image file")


def test_results_as_json_and_csv(workdir, photos):
    dash = dashboard()
    captioner = Captioner(load_checkpoint(workdir / "models" / "best.pt"), "cpu")
    results = captioner.caption_pil([load_image(p) for p in photos], SearchConfig(num_captions=2),
                                    names=["a, \"quoted\" name.jpg", photos[1].name])
    rows = json.loads(dash.results_json(results))
    assert [r["image"] for r in rows] == [r.image for r in results]
    assert rows[0]["caption"] == results[0].captions[0] and rows[0]["captions"] == results[0].captions
    assert rows[0]["png"] == "a, \"quoted\" name_captioned.png"
    table = list(csv.DictReader(io.StringIO(dash.results_csv(results))))
    assert len(table) == sum(len(r.captions) for r in results)
    assert table[0] == {"image": results[0].image, "rank": "1", "caption": results[0].captions[0],
                        "score": f"{results[0].scores[0]:.4f}", "tags": "; ".join(t["word"] for t in results[0].tags),
                        "confidence": "" if results[0].confidence is None else f"{results[0].confidence:.4f}"}
    # The annotated PNG the download button serves: render.py's drawing, in memory.
    from captioning.results.render import save_captioned_image
    png = dash.png_bytes(save_captioned_image, load_image(photos[0]), results[0].captions)
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.width == 800 and im.height > im.width // 2


# ---- the dashboard command and menu option --------------------------------------------------------------

def test_the_cli_and_menu_never_import_streamlit():
    code = "import sys, captioning.interfaces.cli, captioning.interfaces.menu; print('streamlit' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def test_dashboard_without_streamlit_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "streamlit", None)      # as if it were not installed
    assert cli_module.main(["dashboard", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: The dashboard needs Streamlit, which is not installed: "
                   "pip install -r requirements-dashboard.txt")


def test_the_menu_option_without_streamlit_is_one_line_and_the_menu_goes_on(monkeypatch, capsys, tmp_path):
    from rich.console import Console
    monkeypatch.setitem(sys.modules, "streamlit", None)
    monkeypatch.setattr(menu, "out", Console(highlight=False, width=1000))
    monkeypatch.setattr("sys.stdin", io.StringIO("7\n8\n"))
    assert cli_module.main(["--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Open the web dashboard" in out and out.count("Choose:") == 2
    errors = [line[line.index("error:"):] for line in out.splitlines() if "error:" in line]   # input: no echo
    assert errors == ["error: The dashboard needs Streamlit, which is not installed: "
                      "pip install -r requirements-dashboard.txt"]


class FakeServer:
    """Popen's stand-in: records the command and environment instead of serving (the tests below that start
    a real server check what the server does); `wait` plays its script, one entry per call."""
    started = []

    def __init__(self, command, env=None, **kwargs):
        self.command, self.env, self.kwargs, self.pid, self.waits = command, env, kwargs, -1, []
        FakeServer.started.append(self)

    def wait(self, timeout=None):
        self.waits.append(timeout)
        if isinstance(self.plays, signal.Signals) and len(self.waits) == 1:
            os.kill(os.getpid(), self.plays)    # as `kill` would send it to this process
            time.sleep(5)                       # interrupted by the handler at once
        if isinstance(self.plays, BaseException) and len(self.waits) == 1:
            raise self.plays
        return 0


@pytest.fixture
def fake_server(monkeypatch):
    pytest.importorskip("streamlit")
    FakeServer.started, FakeServer.plays = [], None
    monkeypatch.setattr(subprocess, "Popen", FakeServer)
    stops = []
    monkeypatch.setattr(launcher, "stop_group", lambda server, grace: stops.append(grace))
    return FakeServer, stops


def test_dashboard_starts_streamlit_on_this_app_on_loopback(fake_server, capsys, tmp_path):
    photo = tmp_path / "a photo.jpg"
    assert cli_module.main(["dashboard", "--workdir", str(tmp_path), "--port", "9123", "--headless",
                            "--image", f'"{photo}"', "--model", "default"]) == 0
    server = fake_server[0].started[0]
    command = server.command
    assert command[:5] == [sys.executable, "-m", "streamlit", "run", APP]
    assert "--server.port=9123" in command and "--server.headless=true" in command
    assert "--server.address=127.0.0.1" in command and "--server.enableXsrfProtection=true" in command
    app_args = command[command.index("--") + 1:]
    assert app_args == [f"--workdir={tmp_path}", "--device=auto", "--model=default", f"--image={photo}"]
    assert server.kwargs["start_new_session"]             # its own process group: stopped as a whole
    out = capsys.readouterr()
    assert out.err.strip() == "Dashboard at http://127.0.0.1:9123 (Ctrl-C stops it)."   # no warning


def test_dashboard_on_the_network_says_so_and_takes_allow_path_and_a_password(fake_server, capsys, tmp_path,
                                                                            monkeypatch):
    monkeypatch.delenv("IMAGE_CAPTIONING_DASHBOARD_PASSWORD", raising=False)
    (tmp_path / "photos").mkdir()
    assert cli_module.main(["dashboard", "--workdir", str(tmp_path), "--host", "0.0.0.0", "--headless"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: http://0.0.0.0:8501 is reachable from the network: anyone who can reach this computer "
                   "can use it (no password; uploads only, no path box).",
                   "Dashboard at http://0.0.0.0:8501 (Ctrl-C stops it)."]
    # The password from the terminal reaches the server in its environment, never in a command line.
    monkeypatch.setattr("getpass.getpass", lambda prompt: "s3cret")
    monkeypatch.setattr(sys, "stdin", type("Terminal", (io.StringIO,), {"isatty": lambda self: True})())
    assert cli_module.main(["dashboard", "--workdir", str(tmp_path), "--host", "::", "--password",
                            "--allow-path", str(tmp_path / "photos"), "--allow-path", "~"]) == 0
    server = fake_server[0].started[1]
    assert server.env["IMAGE_CAPTIONING_DASHBOARD_PASSWORD"] == "s3cret"
    assert not any("s3cret" in part for part in server.command)
    assert f"--allow-path={tmp_path / 'photos'}" in server.command
    assert f"--allow-path={os.path.expanduser('~')}" in server.command
    err = capsys.readouterr().err
    assert "http://[::]:8501 is reachable from the network" in err and "(a password; photos in" in err


@pytest.mark.parametrize("argv, message", [
    (["--host", "0.0.0.0", "--image", "x.jpg"], "--image needs --allow-path with --host 0.0.0.0: from the network "
                                                "the page reads no folder it was not given."),
    (["--allow-path", "nowhere"], "--allow-path nowhere is not a folder."),
    (["--password", ""], "The dashboard password is empty; give one, or leave out --password.")])
def test_dashboard_refusals_are_one_line(fake_server, capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("getpass.getpass", lambda prompt: "")
    assert cli_module.main(["dashboard", *argv]) == 1
    assert capsys.readouterr().err.strip() == f"error: {message}" and not fake_server[0].started


def test_ctrl_c_stops_the_dashboard_and_the_menu_comes_back(fake_server, monkeypatch, capsys, tmp_path):
    from rich.console import Console
    FakeServer.plays = KeyboardInterrupt()      # the user's Ctrl-C reaches the menu while streamlit serves
    monkeypatch.setattr(menu, "out", Console(highlight=False, width=1000))
    monkeypatch.setattr("sys.stdin", io.StringIO("7\n8\n"))
    assert cli_module.main(["--workdir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "Dashboard stopped." in captured.err and "error" not in captured.out
    assert captured.out.count("Choose:") == 2 and captured.out.rstrip().endswith("Bye.")
    server = FakeServer.started[0]
    assert "--server.headless=false" in server.command    # from the menu, a browser opens
    assert "--server.address=127.0.0.1" in server.command
    assert fake_server[1] == [5]                            # then its process group was stopped
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL   # and the handlers are the menu's again


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_in_the_menus_dashboard_stops_it_and_ends_the_menu(fake_server, monkeypatch, capsys,
                                                                             tmp_path, sig):
    from rich.console import Console
    FakeServer.plays = sig
    monkeypatch.setattr(menu, "out", Console(highlight=False, width=1000))
    monkeypatch.setattr("sys.stdin", io.StringIO("7\n8\n"))
    start = time.time()
    with pytest.raises(SystemExit) as exit_:
        cli_module.main(["--workdir", str(tmp_path)])
    assert exit_.value.code == 128 + sig and time.time() - start < 4
    captured = capsys.readouterr()
    assert "Dashboard stopped." in captured.err and captured.out.count("Choose:") == 1
    assert fake_server[1] == [5] and signal.getsignal(sig) == signal.SIG_DFL


def test_a_server_that_ignores_sigterm_is_killed_with_its_children(tmp_path):
    """serve() on a stand-in that starts a child and ignores SIGTERM: this process gets SIGTERM, and within
    the grace period plus a moment both are gone."""
    psutil = pytest.importorskip("psutil")
    ready = tmp_path / "pids"
    stubborn = (f"import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                f"open({str(ready)!r}, 'w').write(str(c.pid)); time.sleep(60)")

    def send_sigterm_when_ready():
        deadline = time.time() + 30
        while not (ready.exists() and ready.read_text()) and time.time() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)
    import threading
    threading.Thread(target=send_sigterm_when_ready, daemon=True).start()
    start = time.time()
    code, stopped_by = launcher.serve([sys.executable, "-c", stubborn], dict(os.environ), grace=1)
    assert (code, stopped_by) == (None, signal.SIGTERM) and time.time() - start < 20
    child = int(ready.read_text())
    wait_for(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE,
             5, "the server's child to be gone")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ---- the running app in a real browser ------------------------------------------------------------------


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4, messages end in NUL).
    Streamlit draws the page over a websocket after it loads, so `--dump-dom` or `--screenshot` alone would
    catch an empty page; this waits until the text is there, then takes the screenshot."""

    def __init__(self):
        import fcntl   # POSIX only, like the pipe's fd numbers
        to_browser, self._ours_w = os.pipe()
        self._ours_r, from_browser = os.pipe()

        def as_fds_3_and_4():   # in the child: high numbers first so the two dup2s cannot clobber each other
            r, w = fcntl.fcntl(to_browser, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)
        self.proc = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                      "--disable-dev-shm-usage", "--remote-debugging-pipe", "--window-size=1400,1300",
                                      "about:blank"],
                                     preexec_fn=as_fds_3_and_4, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._id, self.session = b"", 0, None

    def call(self, method, timeout=60, **params):
        import select
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._ours_w, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                if not select.select([self._ours_r], [], [], timeout)[0]:
                    raise RuntimeError(f"chromium did not answer {method} within {timeout}s")
                chunk = os.read(self._ours_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed its DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:      # everything else is an event
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url):
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def text(self):
        return self.call("Runtime.evaluate", expression="document.body.innerText", returnByValue=True)[
            "result"].get("value") or ""

    def screenshot(self, path):
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        self.proc.kill()
        self.proc.wait(10)
        os.close(self._ours_r)
        os.close(self._ours_w)


@pytest.fixture
def running(workdir, tmp_path):
    servers = []

    def start(*options):
        servers.append(Dashboard(workdir, tmp_path, *options))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def test_the_server_listens_on_127_0_0_1_only(running, tmp_path):
    psutil = pytest.importorskip("psutil")
    server = running()
    listening = [c.laddr for p in server.processes() for c in p.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", server.port)]   # as the OS sees it
    assert f"Dashboard at http://127.0.0.1:{server.port} (Ctrl-C stops it)." in server.log_path.read_text()
    # Nothing on this computer is served by path, however the path is spelled.
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the web")
    for path in [f"/{secret}", f"/media/{secret}", f"/app/static/../../..{secret}", f"/static/..%2f..%2f..{secret}",
                 f"/component/..%2f..%2f..{secret}", f"/_stcore/..%2f..{secret}"]:
        try:
            body = server.get(path)[1]
        except urllib.error.HTTPError as e:
            body = e.read()
        assert b"not for the web" not in body, path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_stops_the_server_and_frees_the_port(running, sig):
    psutil = pytest.importorskip("psutil")
    server = running()
    tree = server.processes()
    assert len(tree) >= 2                              # the dashboard command and the streamlit server
    start = time.time()
    os.kill(server.proc.pid, sig)                      # to the dashboard process only, as `kill` does
    assert server.proc.wait(10) == 128 + sig
    gone, alive = psutil.wait_procs(tree[1:], timeout=max(0.1, 10 - (time.time() - start)))
    assert not alive, f"still running {time.time() - start:.1f}s after {sig.name}: {alive}"
    with socket.socket() as s:                         # a new server can take the port at once
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as servers (Streamlit's too) bind
        s.bind(("127.0.0.1", server.port))
        s.listen()
    assert server.log_path.read_text().rstrip().endswith("Dashboard stopped.")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium on PATH "
                    "(apt-get install chromium); .ci/run installs it")
def test_the_running_dashboard_in_headless_chromium(running, workdir, photos, tmp_path):
    want = expected_captions(workdir, photos[0]).captions[0]
    server = running("--image", photos[0])
    browser = None
    try:
        browser = Chromium()
        browser.open(server.url)
        wait_for(lambda: want in browser.text(), 240, f"the caption '{want}' in the page")   # 2 busy cores
        wait_for(lambda: "All results (CSV)" in browser.text(), 60, "the end of the page")
        time.sleep(1)   # let the images finish drawing
        shot = tmp_path / "dashboard.png"
        browser.screenshot(shot)
        page = browser.text()
    finally:
        if browser:
            browser.close()
    os.kill(server.proc.pid, signal.SIGINT)    # Ctrl-C, as a user stops it
    assert server.proc.wait(20) == 0
    with Image.open(shot) as im:
        assert im.width == 1400 and im.height > 800
        assert len(im.convert("L").getcolors(1 << 16)) > 50   # a drawn page, not a blank one
    assert "Caption photos" in page and "Model card" in page and "Annotated PNG" in page
    assert "Traceback" not in page and "Error" not in page
    assert "Dashboard stopped." in server.log_path.read_text()


def playwright_chromium():
    """Playwright's sync API, or a skip: pip's playwright cannot download its browser here, so it drives
    Debian's chromium."""
    sync_api = pytest.importorskip("playwright.sync_api", exc_type=ImportError)   # a broken install too
    if shutil.which("chromium") is None:
        pytest.skip("needs Debian's chromium on PATH (apt-get install chromium); .ci/run installs it")
    return sync_api.sync_playwright, shutil.which("chromium")


def test_three_people_uploading_at_once_all_get_their_captions(running, workdir, photos, tmp_path):
    sync_playwright, chromium = playwright_chromium()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photo at all")
    uploads = [[photos[0]], [photos[1], photos[0]], [broken, photos[1]]]   # the third person's first file is bad
    want = {p: expected_captions(workdir, p).captions[0] for p in photos}
    server = running()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            pages = [browser.new_context().new_page() for _ in uploads]    # a context each: separate people
            for page in pages:   # the first page loads the model (once per server), the others find it loaded
                page.goto(server.url)
                page.wait_for_selector("input[type=file]", state="attached", timeout=240_000)
            start = time.time()
            for page, files in zip(pages, uploads):   # all three upload before any has its captions
                page.set_input_files("input[type=file]", [str(f) for f in files])
            for page, files in zip(pages, uploads):
                for f in files:
                    if f == broken:
                        page.get_by_text("Not an image file").wait_for(timeout=180_000)
                    else:
                        page.get_by_text(want[f], exact=True).first.wait_for(timeout=180_000)
                page.get_by_text("All results (CSV)").wait_for(timeout=60_000)
            took = time.time() - start
            texts_ = [page.inner_text("body") for page in pages]
        finally:
            browser.close()
    assert all("Traceback" not in t for t in texts_) and "Not an image file" not in texts_[0] + texts_[1]
    print(f"3 pages, 5 uploads: all captioned {took:.1f}s after the uploads began")
