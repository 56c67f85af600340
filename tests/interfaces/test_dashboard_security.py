"""The dashboard against the attacks of a security review (issue 23), each as the attacker would try it:
other host names (DNS rebinding), a dozen sessions at once, uploads before the password, NUL bytes,
probing outside --allow-path, a symlink swapped in after the check, password guessing from many sessions,
a visitor's "clear cache", --password without a terminal, and no outbound address lookup. The running
server is spoken to over Streamlit's own websocket protocol, as the page's JavaScript speaks it."""
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from captioning.interfaces import cli as cli_module
from captioning.interfaces import launcher
from tests.helpers import ROOT
from tests.helpers import Dashboard, dashboard, expected_captions, shown_photos, texts

PASSWORD = "correct horse"


# ---- the running server, as a browser (or a script posing as one) talks to it ----------------------

@pytest.fixture(scope="module")
def server(attention_model, shapes_data, tmp_path_factory):
    """One password-protected dashboard for this module's tests (starting one costs seconds on 2 cores),
    showing a photo at start (--image) so that every logged-in session captions it."""
    pytest.importorskip("streamlit")
    pytest.importorskip("websockets.sync.client")
    tmp = tmp_path_factory.mktemp("secure-dashboard")
    (tmp / "work" / "models").mkdir(parents=True)
    shutil.copy(attention_model[1], tmp / "work" / "models" / "best.pt")
    photo = sorted((shapes_data / "Images").glob("*.jpg"))[0]
    os.environ["IMAGE_CAPTIONING_DASHBOARD_PASSWORD"] = PASSWORD   # the server's environment is this one's
    try:
        running = Dashboard(tmp / "work", tmp, "--image", photo)
    finally:
        del os.environ["IMAGE_CAPTIONING_DASHBOARD_PASSWORD"]
    running.photo, running.workdir = photo, tmp / "work"
    yield running
    running.close()


class Session:
    """One visitor over Streamlit's websocket: ask for a run (with widget values, by label), read what
    the run draws until it ends."""

    def __init__(self, server):
        from websockets.sync.client import connect
        self._open = contextlib.ExitStack()
        self.ws = self._open.enter_context(connect(f"ws://127.0.0.1:{server.port}/_stcore/stream",
                                                   subprotocols=["streamlit"], open_timeout=30, max_size=None))
        self.id, self.widgets = None, {}

    def send(self, **kind):
        from streamlit.proto.BackMsg_pb2 import BackMsg
        msg = BackMsg(**kind)
        self.ws.send(msg.SerializeToString())

    def run(self, timeout=240, **values):
        from streamlit.proto.BackMsg_pb2 import BackMsg
        msg = BackMsg()
        msg.rerun_script.query_string = ""
        for label, value in values.items():
            widget = msg.rerun_script.widget_states.widgets.add()
            widget.id, widget.string_value = self.widgets[label], value
        self.ws.send(msg.SerializeToString())
        return self.read(timeout)

    def read(self, timeout):
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
        page = {"markdown": [], "alert": [], "exception": []}
        deadline = time.time() + timeout
        while True:
            msg = ForwardMsg()
            msg.ParseFromString(self.ws.recv(timeout=max(1, deadline - time.time())))
            kind = msg.WhichOneof("type")
            if kind == "new_session":
                self.id = msg.new_session.initialize.session_id
            elif kind == "delta" and msg.delta.WhichOneof("type") == "new_element":
                element = msg.delta.new_element
                what = element.WhichOneof("type")
                if what == "text_input":
                    self.widgets[element.text_input.label] = element.text_input.id
                elif what in page:
                    body = getattr(element, what)
                    page[what].append(f"{body.type}: {body.message}" if what == "exception" else body.body)
            elif kind == "script_finished" and msg.script_finished != ForwardMsg.FINISHED_EARLY_FOR_RERUN:
                return page

    def close(self):
        self._open.close()


def handshake(server, host):
    """The HTTP status of a websocket upgrade to the server sent with this Host header (101: it opens)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                  "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  "Sec-WebSocket-Protocol: streamlit\r\n\r\n".encode())
        return int(s.recv(1024).split()[1])


def upload(server, session, name, data):
    """PUT a file to the session's upload address, as Streamlit's uploader does (XSRF token in a cookie
    and a header); → the HTTP status."""
    from streamlit.web.server.starlette.starlette_app_utils import generate_xsrf_token_string
    token, boundary = generate_xsrf_token_string(), "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        f"{server.url}/_stcore/upload_file/{session.id}/{name}", data=body, method="PUT",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}", "X-Xsrftoken": token,
                 "Cookie": f"_streamlit_xsrf={token}"})
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_other_host_names_are_refused(server):
    """DNS rebinding: a web page points its own name at 127.0.0.1, and the browser sends that name."""
    assert handshake(server, "evil.example") == 403
    assert handshake(server, f"evil.example:{server.port}") == 403
    assert handshake(server, "127.0.0.1.evil.example") == 403
    for ours in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "LOCALHOST"):
        assert handshake(server, ours) == 101, ours
    assert server.get("/_stcore/health")[0] == 200


def test_a_dozen_sessions_at_once_then_one_logs_in_and_captions(server):
    """Page loads at once, without the password, used to leave every session failing ("No module named
    'ctypes'") until a restart: the page rewrote sys.path on every run while other runs imported."""
    pages, crashes = [], []
    together = threading.Barrier(12, timeout=120)

    def visitor():
        try:
            session = Session(server)
            together.wait()                    # all twelve ask for their first run at once
            for _ in range(3):
                pages.append(session.run())
            session.close()
        except Exception as e:   # noqa: BLE001 - reported below
            crashes.append(repr(e))
    threads = [threading.Thread(target=visitor) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not crashes and len(pages) == 36
    assert [p["exception"] for p in pages if p["exception"]] == []
    session = Session(server)
    assert session.run()["alert"] == []      # the password box, nothing else
    page = session.run(Password=PASSWORD)
    session.close()
    assert not page["exception"] and not page["alert"], page
    assert f"**{expected_captions(server.workdir, server.photo).captions[0]}**" in page["markdown"]


def test_no_uploads_before_the_password_and_not_too_many_after(server):
    photo = server.photo.read_bytes()
    session = Session(server)
    session.run()
    assert upload(server, session, "a.jpg", photo) == 403        # the page has no uploader yet; the URL does
    session.run(Password=PASSWORD)
    assert upload(server, session, "a.jpg", photo) == 204
    dash = dashboard()
    assert all(upload(server, session, f"{i}.jpg", b"x") == 204 for i in range(1, dash.MAX_UPLOADS))
    assert upload(server, session, "one-too-many.jpg", b"x") == 413
    assert upload(server, session, "a.jpg", photo) == 204        # the same file again replaces it
    session.close()


def test_wrong_passwords_are_logged_by_the_server(server):
    session = Session(server)
    session.run()
    assert session.run(Password="guess 1")["alert"] == ["Wrong password."]
    session.close()
    assert "dashboard: wrong password from this computer (session " in server.log_path.read_text()


# ---- the page itself (AppTest), and its helpers -------------------------------------------------------

class WatchedPath(list):
    """sys.path that notes which file each change to it comes from."""
    def __init__(self, items):
        super().__init__(items)
        self.edits = []

    def _note(name):
        def edit(self, *args):
            self.edits.append(sys._getframe(1).f_code.co_filename)
            return getattr(list, name)(self, *args)
        return edit
    for _name in ("__setitem__", "__delitem__", "__iadd__", "append", "insert", "remove", "pop", "extend", "clear"):
        locals()[_name] = _note(_name)


def test_a_rerun_leaves_sys_path_alone(app, workdir, photos, monkeypatch):
    """The race behind "No module named 'ctypes'" needs the page to edit sys.path while other sessions'
    threads import: it must not edit it at all (the concurrent sessions above catch the race itself, when
    it strikes)."""
    watched = WatchedPath(sys.path)
    monkeypatch.setattr(sys, "path", watched)
    at = app("--workdir", workdir, "--no-segmentation", "--image", photos[0])
    at.run()
    assert not at.exception
    assert [f for f in watched.edits if f.endswith("dashboard.py")] == []


def test_nul_bytes_in_a_typed_path_or_an_upload_name_are_one_line(app, workdir, photos):
    at = app("--workdir", workdir, "--no-segmentation")
    at.text_input[0].set_value(f"{photos[0].parent}/a\0b.jpg").run()
    assert not at.exception and texts(at.error) == [f"The path has a NUL character in it: {photos[0].parent}/a?b.jpg"]
    at.text_input[0].set_value("")
    at.file_uploader[0].set_value(("evil\0name\n.jpg", photos[0].read_bytes(), "image/jpeg")).run()
    assert not at.exception and not at.error
    assert shown_photos(at) == ["#### evil?name?\\.jpg"]
    assert f"**{expected_captions(workdir, photos[0]).captions[0]}**" in texts(at.markdown)


def test_no_traceback_reaches_a_visitor(app, workdir, monkeypatch):
    """An unexpected error (a bug, say) shows Streamlit's generic sentence: no traceback, no message
    naming this computer's paths. `dashboard` starts Streamlit so, and the page asks for it too."""
    from streamlit import config
    dash = dashboard()

    def bug(*args):
        raise RuntimeError(f"something broke in {ROOT}")
    monkeypatch.setattr(dash, "model_card", bug)
    from streamlit.testing.v1 import AppTest   # not app(): it fails on any exception; its teardown still runs
    at = AppTest.from_file(str(ROOT / "captioning" / "interfaces" / "dashboard.py"), default_timeout=120)
    monkeypatch.setattr(sys, "argv", ["dashboard.py", "--workdir", str(workdir), "--no-segmentation"])
    at.run()
    assert config.get_option("client.showErrorDetails") == "none"
    assert len(at.exception) == 1
    shown = at.exception[0]
    assert str(ROOT) not in shown.message and not list(shown.stack_trace)
    command, _ = launcher.dashboard_command(cli_module.build_parser().parse_args(["dashboard"]))
    assert "--client.showErrorDetails=none" in command


def test_nothing_outside_allow_path_is_probed(app, workdir, photos, tmp_path):
    """`A/../B/x/../../A/in.jpg` resolves inside A whether or not B/x exists; listed as typed, the answer
    told which (the photo, or "not found")."""
    inside, outside = tmp_path / "A", tmp_path / "B"
    inside.mkdir()
    (outside / "exists").mkdir(parents=True)
    shutil.copy(photos[0], inside / "in.jpg")
    at = app("--workdir", workdir, "--no-segmentation", "--allow-path", inside, host="0.0.0.0")
    answers = []
    for probe in ("exists", "missing"):
        at.text_input[0].set_value(f"{inside}/../B/{probe}/../../A/in.jpg").run()
        assert not at.exception
        answers.append((texts(at.error), shown_photos(at)))
    assert answers[0] == answers[1] == ([], ["#### in\\.jpg"])


def test_a_symlink_swapped_in_after_the_check_is_refused(tmp_path, photos):
    dash = dashboard()
    inside, outside = tmp_path / "A", tmp_path / "B"
    inside.mkdir()
    outside.mkdir()
    shutil.copy(photos[0], inside / "in.jpg")
    shutil.copy(photos[1], outside / "secret.jpg")
    found, errors = dash.gather_photos([], str(inside / "in.jpg"), allowed=[str(inside)])
    assert not errors and len(found) == 1
    (tmp_path / "link").symlink_to(outside / "secret.jpg")
    os.replace(tmp_path / "link", inside / "in.jpg")          # between the check and the open
    with pytest.raises(dash.CaptioningError) as err:
        found[0].full()
    assert str(err.value) == f"{inside / 'in.jpg'} is outside the folders this dashboard may read ({inside})."


def test_wrong_passwords_are_limited_for_the_whole_server(app, workdir, monkeypatch, capsys):
    """Each session waits a second after a wrong password; ten sessions made that ten guesses a second."""
    dash = dashboard()
    monkeypatch.setenv("IMAGE_CAPTIONING_DASHBOARD_PASSWORD", PASSWORD)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    monkeypatch.setattr(dash, "PASSWORD_TRIES", 3)
    first, second = app("--workdir", workdir), app("--workdir", workdir)   # two visitors
    first.text_input[0].set_value("guess 1").run()
    first.run()                                                  # the same text again is no new guess
    second.text_input[0].set_value("guess 2").run()
    second.text_input[0].set_value("guess 3").run()
    assert texts(second.error) == ["Wrong password."]
    first.text_input[0].set_value(PASSWORD).run()                # the right one, too late
    assert texts(first.error) == ["Too many wrong passwords; this dashboard takes no more for up to 60 seconds."]
    assert not first.file_uploader
    log = [line for line in capsys.readouterr().err.splitlines() if "wrong password" in line]
    assert len(log) == 3 and log[-1].endswith("3 in the last 60 s)")
    monkeypatch.setattr(dash, "_FAILURES", type(dash._FAILURES)())   # a minute later
    first.run()
    assert not first.error and first.file_uploader


def test_a_visitors_clear_cache_does_not_reload_the_model(app, workdir, photos, monkeypatch):
    """Streamlit's "clear cache" message, which any visitor can send, password or not, empties every
    st.cache_resource and st.cache_data (AppSession._handle_clear_cache_request): the models are not kept
    there."""
    import streamlit as st
    import captioning.training.checkpoint
    loads = []
    real = captioning.training.checkpoint.load_checkpoint
    monkeypatch.setattr(captioning.training.checkpoint, "load_checkpoint", lambda *a, **k: loads.append(a) or real(*a, **k))
    at = app("--workdir", workdir, "--no-segmentation", "--image", photos[0])
    st.cache_data.clear()
    st.cache_resource.clear()
    at.run()
    assert not at.exception and len(loads) == 1


def test_password_without_a_terminal_says_to_use_the_environment(monkeypatch, capsys, tmp_path):
    pytest.importorskip("streamlit")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hunter2\n"))   # a pipe: getpass would read it, echoing
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("the server started"))
    assert cli_module.main(["dashboard", "--workdir", str(tmp_path), "--password"]) == 1
    assert capsys.readouterr().err.strip() == ("error: --password without TEXT asks at a terminal, and there is "
                                               "none: set IMAGE_CAPTIONING_DASHBOARD_PASSWORD instead.")


def test_the_command_names_the_hosts_and_asks_no_one_for_an_address(tmp_path):
    """On every interface and headless, Streamlit asks checkip.amazonaws.com for this computer's address
    unless browser.serverAddress is set. Streamlit's own start-up code, given our command's options, runs
    in a child process (its config is global) with that lookup replaced by a note."""
    pytest.importorskip("streamlit")
    args = cli_module.build_parser().parse_args(["dashboard", "--host", "0.0.0.0", "--headless"])
    command, _ = launcher.dashboard_command(args)
    options = {part[2:].split("=", 1)[0]: part.split("=", 1)[1] for part in command[5:command.index("--")]}
    child = ("import sys, json; from streamlit import config, net_util; from streamlit.web import bootstrap\n"
             "options = {k: {'true': True, 'false': False}.get(v, int(v) if v.isdigit() else v)\n"
             "           for k, v in json.loads(sys.argv[1]).items()}\n"
             "bootstrap.load_config_options({k.replace('.', '_'): v for k, v in options.items()})\n"
             "net_util.get_external_ip = lambda: print('ASKED') or None\n"
             "bootstrap._print_url(False)\n")
    flags = {k: v for k, v in options.items() if k != "server.allowedHosts"}
    r = subprocess.run([sys.executable, "-c", child, json.dumps(flags)], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ASKED" not in r.stdout and "URL: http://localhost:8501" in r.stdout
    assert options["server.maxUploadSize"] == str(launcher.UPLOAD_MB)
    # The host names it answers to: loopback, this computer's own name on every interface, --allow-host.
    args = cli_module.build_parser().parse_args(["dashboard", "--host", "0.0.0.0", "--allow-host", "photos.example"])
    hosts = [part.split("=", 1)[1] for part in launcher.dashboard_command(args)[0]
             if part.startswith("--server.allowedHosts=")]
    assert hosts[:3] == ["localhost", "127.0.0.1", "::1"] and hosts[-1] == "photos.example"
    assert "0.0.0.0" not in hosts and socket.gethostname().lower() in hosts
    args = cli_module.build_parser().parse_args(["dashboard", "--host", "192.168.1.7"])
    assert [part for part in launcher.dashboard_command(args)[0] if part.startswith("--server.allowedHosts=")] == [
        f"--server.allowedHosts={h}" for h in ("localhost", "127.0.0.1", "::1", "192.168.1.7")]
