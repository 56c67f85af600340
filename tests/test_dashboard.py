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

from captioning import cli as cli_module
from captioning import menu
from captioning.captioner import Captioner
from captioning.checkpoint import describe, load_checkpoint, summarize
from captioning.encoders import load_image
from captioning.search import SearchConfig
from captioning.utils import CaptioningError
from tests.conftest import ROOT

APP = str(ROOT / "captioning" / "dashboard.py")


def dashboard():
    """The dashboard module for its helpers (it needs streamlit: skip without it)."""
    pytest.importorskip("streamlit")
    from captioning import dashboard
    return dashboard


@pytest.fixture
def workdir(attention_model, tmp_path):
    """A fresh workdir holding a copy of the fixture's best model."""
    _, best = attention_model
    (tmp_path / "work" / "models").mkdir(parents=True)
    shutil.copy(best, tmp_path / "work" / "models" / "best.pt")
    return tmp_path / "work"


@pytest.fixture
def photos(shapes_data):
    return sorted((shapes_data / "Images").glob("*.jpg"))[:2]


@pytest.fixture
def app(monkeypatch):
    """AppTest for the dashboard with these command-line arguments; caches start empty."""
    st = pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    def make(*argv):
        st.cache_resource.clear()
        monkeypatch.setattr(sys, "argv", ["dashboard.py", *map(str, argv)])
        at = AppTest.from_file(APP, default_timeout=120)
        at.run()
        assert not at.exception, at.exception
        return at
    return make


def expected_captions(workdir, image_path, beam=3, count=3):
    captioner = Captioner(load_checkpoint(workdir / "models" / "best.pt"), "cpu")
    return captioner.caption_pil([load_image(image_path)], SearchConfig(beam_size=beam, num_captions=count))[0]


def texts(elements):
    return [e.value for e in elements]


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
    import captioning.checkpoint
    loads = []
    real = captioning.checkpoint.load_checkpoint
    monkeypatch.setattr(captioning.checkpoint, "load_checkpoint", lambda *a, **k: loads.append(a) or real(*a, **k))
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
    assert "resnet18" in facts.loc[1, "value"] and "Show, Attend and Tell" in facts.loc[2, "value"]
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


def test_segmentation_beside_the_caption(app, workdir, photos, monkeypatch):
    from captioning import segment
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
                        "score": f"{results[0].scores[0]:.4f}"}
    # The annotated PNG the download button serves: render.py's drawing, in memory.
    from captioning.render import save_captioned_image
    png = dash.png_bytes(save_captioned_image, load_image(photos[0]), results[0].captions)
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.width == 800 and im.height > im.width // 2


# ---- the dashboard command and menu option --------------------------------------------------------------

def test_the_cli_and_menu_never_import_streamlit():
    code = "import sys, captioning.cli, captioning.menu; print('streamlit' in sys.modules)"
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
    monkeypatch.setattr("sys.stdin", io.StringIO("8\n7\n"))
    assert cli_module.main(["--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Open the web dashboard" in out and out.count("Choose:") == 2
    errors = [line[line.index("error:"):] for line in out.splitlines() if "error:" in line]   # input: no echo
    assert errors == ["error: The dashboard needs Streamlit, which is not installed: "
                      "pip install -r requirements-dashboard.txt"]


def test_dashboard_starts_streamlit_on_this_app(monkeypatch, tmp_path):
    pytest.importorskip("streamlit")
    started = []

    class FakeServer:            # records the command instead of serving; the browser test starts it for real
        def __init__(self, command):
            started.append(command)

        def wait(self, timeout=None):
            return 0
    monkeypatch.setattr(subprocess, "Popen", FakeServer)
    photo = tmp_path / "a photo.jpg"
    assert cli_module.main(["dashboard", "--workdir", str(tmp_path), "--port", "9123", "--headless",
                            "--image", f'"{photo}"', "--model", "default"]) == 0
    command = started[0]
    assert command[:5] == [sys.executable, "-m", "streamlit", "run", APP]
    assert "--server.port=9123" in command and "--server.headless=true" in command
    app_args = command[command.index("--") + 1:]
    assert app_args == [f"--workdir={tmp_path}", "--device=auto", "--model=default", f"--image={photo}"]



def test_ctrl_c_stops_the_dashboard_and_the_menu_comes_back(monkeypatch, capsys, tmp_path):
    pytest.importorskip("streamlit")
    from rich.console import Console
    started, waits = [], []

    class ServerStoppedByCtrlC:
        def __init__(self, command):
            started.append(command)

        def wait(self, timeout=None):
            waits.append(timeout)
            if len(waits) == 1:
                raise KeyboardInterrupt    # the user's Ctrl-C reaches the menu while streamlit serves
            return 0
    monkeypatch.setattr(subprocess, "Popen", ServerStoppedByCtrlC)
    monkeypatch.setattr(menu, "out", Console(highlight=False, width=1000))
    monkeypatch.setattr("sys.stdin", io.StringIO("8\n7\n"))
    assert cli_module.main(["--workdir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "Dashboard stopped." in captured.err and "error" not in captured.out
    assert captured.out.count("Choose:") == 2 and captured.out.rstrip().endswith("Bye.")
    assert "--server.headless=false" in started[0]     # from the menu, a browser opens
    assert waits == [None, 10]                         # then it waited for streamlit to shut down


# ---- the running app in a real browser ------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def wait_for(condition, timeout, what, poll=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium on PATH "
                    "(apt-get install chromium); .ci/run installs it")
def test_the_running_dashboard_in_headless_chromium(workdir, photos, tmp_path):
    pytest.importorskip("streamlit")
    want = expected_captions(workdir, photos[0]).captions[0]
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    # The real entry point, as a user starts it; its own process group so that the streamlit child stops too.
    server = subprocess.Popen([sys.executable, str(ROOT / "image_captioning.py"), "dashboard", "--headless",
                               "--port", str(port), "--workdir", str(workdir), "--image", str(photos[0]),
                               "--no-segmentation"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    browser = None
    try:
        def healthy():
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never via a proxy
                return direct.open(f"http://localhost:{port}/_stcore/health", timeout=2).status == 200
            except OSError:
                return False
        wait_for(healthy, 90, "the dashboard server")
        browser = Chromium()
        browser.open(f"http://localhost:{port}")
        wait_for(lambda: want in browser.text(), 90, f"the caption '{want}' in the page")
        wait_for(lambda: "All results (CSV)" in browser.text(), 60, "the end of the page")
        time.sleep(1)   # let the images finish drawing
        shot = tmp_path / "dashboard.png"
        browser.screenshot(shot)
        page = browser.text()
    finally:
        if browser:
            browser.close()
        os.killpg(server.pid, signal.SIGINT)    # Ctrl-C, as a user stops it
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        log.close()
    with Image.open(shot) as im:
        assert im.width == 1400 and im.height > 800
        assert len(im.convert("L").getcolors(1 << 16)) > 50   # a drawn page, not a blank one
    assert "Caption photos" in page and "Model card" in page and "Annotated PNG" in page
    assert "Traceback" not in page and "Error" not in page
    assert "Dashboard stopped." in (tmp_path / "server.log").read_text()
