"""The `dashboard` command: start the Streamlit server on captioning/interfaces/dashboard.py and supervise it
(loopback by default, the Host names it answers to, a password kept out of argv, its process group stopped
with it). Streamlit is optional: it is only looked for here, never imported.
"""
import importlib.util
import os
import signal
import sys

from rich.markup import escape

from captioning.utils import CaptioningError, clean_user_path, console


PASSWORD_ENV = "IMAGE_CAPTIONING_DASHBOARD_PASSWORD"   # the dashboard reads it too: a password kept out of argv


def is_loopback(host):
    """True when `host` is reachable from this computer only. A name other than localhost counts as the network."""
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


WILDCARDS = ("0.0.0.0", "::", "[::]", "")
UPLOAD_MB = 50   # the largest upload Streamlit takes, in MB; the page reads photos by path up to this size too


def allowed_hosts(args):
    """The Host names the server answers to (DNS rebinding: a page may point its own name at 127.0.0.1,
    and the browser then sends that name). Loopback always; --host; on every interface, this computer's
    own names and addresses as it knows them locally; and --allow-host."""
    import socket
    hosts = ["localhost", "127.0.0.1", "::1"]
    if args.host not in WILDCARDS:
        hosts.append(args.host.strip("[]"))
    else:
        name = socket.gethostname()
        hosts += [name, f"{name}.local"]
        try:
            hosts += [info[4][0] for info in socket.getaddrinfo(name, None)]
        except OSError:
            pass
    hosts += args.allow_host
    return list(dict.fromkeys(h.lower() for h in hosts if h))


def dashboard_command(args):
    """The `streamlit run` command line for the dashboard, and the URL it will answer on."""
    from pathlib import Path
    app = [f"--workdir={os.path.abspath(args.workdir)}", f"--device={args.device}"]
    if args.model:
        app.append(f"--model={args.model if args.model == 'default' else os.path.abspath(args.model)}")
    if args.image:
        app.append(f"--image={os.path.abspath(clean_user_path(args.image))}")
    app += [f"--allow-path={os.path.abspath(clean_user_path(d))}" for d in args.allow_path]
    if args.no_segmentation:
        app.append("--no-segmentation")
    # XSRF protection is Streamlit's default; it is spelled out so that no config file can turn it off.
    # browser.serverAddress, set, keeps Streamlit from asking a web service for this computer's external
    # address (it does on every interface, headless); no error details: no traceback reaches a visitor.
    command = [sys.executable, "-m", "streamlit", "run", str(Path(__file__).with_name("dashboard.py")),
               f"--server.address={args.host}", f"--server.port={args.port}",
               "--server.enableXsrfProtection=true", "--server.enableCORS=true",
               *[f"--server.allowedHosts={h}" for h in allowed_hosts(args)],
               f"--browser.serverAddress={'localhost' if args.host in WILDCARDS else args.host.strip('[]')}",
               f"--server.maxUploadSize={UPLOAD_MB}", "--client.showErrorDetails=none",
               "--browser.gatherUsageStats=false", "--server.fileWatcherType=none", "--client.toolbarMode=minimal",
               f"--server.headless={'true' if args.headless else 'false'}", "--", *app]
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    return command, f"http://{host}:{args.port}"


def cmd_dashboard(args):
    """Serve captioning/interfaces/dashboard.py with Streamlit until it ends or this process gets Ctrl-C, SIGTERM or
    SIGHUP. Streamlit is optional, so it is only looked for here, never imported by the CLI."""
    from pathlib import Path
    spec = importlib.util.find_spec("streamlit")
    if spec is None:
        raise CaptioningError("The dashboard needs Streamlit, which is not installed: "
                              "pip install -r requirements-dashboard.txt")
    if "server.allowedHosts" not in Path(spec.origin).with_name("config.py").read_text(encoding="utf-8"):
        raise CaptioningError("This Streamlit is too old for the dashboard (it cannot refuse other host names): "
                              "pip install -U -r requirements-dashboard.txt")
    for folder in args.allow_path:
        if not os.path.isdir(clean_user_path(folder)):
            raise CaptioningError(f"--allow-path {folder} is not a folder.")
    local = is_loopback(args.host)
    if args.image and not local and not args.allow_path:
        raise CaptioningError(f"--image needs --allow-path with --host {args.host}: from the network the page "
                              "reads no folder it was not given.")
    env = dict(os.environ)
    # The server imports the package from here (dashboard.py does not edit sys.path as it serves).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))   # above captioning/interfaces/
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if args.password is not None:
        import getpass
        if args.password is True and not sys.stdin.isatty():   # getpass would read (and echo) a pipe instead
            raise CaptioningError(f"--password without TEXT asks at a terminal, and there is none: set "
                                  f"{PASSWORD_ENV} instead.")
        env[PASSWORD_ENV] = getpass.getpass("Dashboard password: ") if args.password is True else args.password
        if not env[PASSWORD_ENV]:
            raise CaptioningError("The dashboard password is empty; give one, or leave out --password.")
    command, url = dashboard_command(args)
    if not local:
        guard = "a password" if env.get(PASSWORD_ENV) else "no password"
        reads = f"photos in {', '.join(args.allow_path)}" if args.allow_path else "uploads only, no path box"
        console.print(f"[yellow]warning:[/] {escape(url)} is reachable from the network: anyone who can reach this "
                      f"computer can use it ({guard}; {escape(reads)}).")
    console.print(f"Dashboard at {escape(url)} (Ctrl-C stops it).")
    code, stopped_by = serve(command, env)
    if stopped_by is not None:
        console.print("Dashboard stopped.")
        if stopped_by != signal.SIGINT:   # told to end (a service manager, a closed terminal): the menu too
            raise SystemExit(128 + stopped_by)
        return
    if code != 0:
        raise CaptioningError(f"The dashboard stopped with exit code {code} (see its messages above).")


def serve(command, env, grace=5):
    """Run the server until it exits (→ (exit code, None)) or this process gets Ctrl-C, SIGTERM or SIGHUP
    (→ (None, that signal)), then stop it. It runs in its own process group so that everything it starts
    stops with it, and (on Linux) it is killed if this process dies without a word."""
    import subprocess
    caught = []

    def on_signal(signum, frame):
        caught.append(signum)
        raise KeyboardInterrupt
    stops = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    before = {s: signal.getsignal(s) for s in stops + [signal.SIGINT]}
    for s in stops:
        signal.signal(s, on_signal)
    server = None
    try:
        server = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        return server.wait(), None
    except KeyboardInterrupt:
        for s in stops + [signal.SIGINT]:   # a second Ctrl-C must not cut the shutdown short
            signal.signal(s, signal.SIG_IGN)
        if server is not None:
            stop_group(server, grace)
        return None, caught[0] if caught else signal.SIGINT
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def stop_group(server, grace):
    """SIGTERM to the server's process group; SIGKILL to whatever of it is left after `grace` seconds."""
    import subprocess
    kill = getattr(os, "killpg", None)
    for sig, wait in ((signal.SIGTERM, grace), (getattr(signal, "SIGKILL", signal.SIGTERM), 10)):
        try:
            kill(server.pid, sig) if kill else server.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            return   # the whole group is gone
        try:
            server.wait(wait)
        except subprocess.TimeoutExpired:
            pass


def _die_with_parent():
    """In the server, before Streamlit starts: Linux sends it SIGTERM if the dashboard process dies (even by
    SIGKILL, which leaves no chance to stop it), instead of leaving it listening as an orphan."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)   # 1 = PR_SET_PDEATHSIG
