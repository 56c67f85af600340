"""The dashboard under load: several people uploading real photos at once, in a real headless Chromium.

One server (`image_captioning.py dashboard --model default --no-segmentation`, the built-in model with
MobileNetV2's ImageNet weights from ../shared/torch_home), warmed up by one page with one photo (the models
load once per server). Then, for each setting, that many browser contexts (separate people) each upload
their own distinct Flickr8k photos at the same moment; a page is done when every photo has its "Annotated
PNG" button and the "All results (CSV)" button is there. Reported: each page's seconds from the uploads to
done, photos per second over the whole setting, and the server's peak resident memory.

Needs pip's playwright and Debian's chromium (`apt-get install chromium`).

    python -m bench.dashboard_load                    # ~2 min on 2 cores: 1x1, 2x2, 4x4, 8x4
    python -m bench.dashboard_load --settings 3x2     # users x photos each
"""
import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from bench.common import ROOT, SHARED, Others, flickr_images, machine, table


def start_server(port):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_HOME": str(SHARED / "torch_home")}
    server = subprocess.Popen([sys.executable, str(ROOT / "image_captioning.py"), "dashboard", "--headless",
                               "--port", str(port), "--model", "default", "--no-segmentation"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(180):
        try:
            if direct.open(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status == 200:
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    sys.exit("the dashboard did not start within 90 s")


def rss_mb(pid):
    import psutil
    me = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 1e6


def run_setting(browser, url, photos, users, each, server_pid, timeout=600):
    """`users` pages upload `each` photos at once → (seconds per page, peak server RSS in MB)."""
    pages = [browser.new_context().new_page() for _ in range(users)]
    for page in pages:
        page.goto(url)
        page.wait_for_selector("input[type=file]", state="attached", timeout=120_000)
    batches = [photos[i * each:(i + 1) * each] for i in range(users)]
    start = time.perf_counter()
    for page, batch in zip(pages, batches):
        page.set_input_files("input[type=file]", [str(p) for p in batch])
    done, peak = {}, rss_mb(server_pid)
    while len(done) < users and time.perf_counter() - start < timeout:
        for i, page in enumerate(pages):
            if i not in done and page.get_by_text("Annotated PNG").count() == each \
                    and page.get_by_text("All results (CSV)").count():
                done[i] = time.perf_counter() - start
        peak = max(peak, rss_mb(server_pid))
        time.sleep(0.5)
    for page in pages:
        page.context.close()
    if len(done) < users:
        sys.exit(f"{users - len(done)} of {users} pages had no captions after {timeout} s")
    return [done[i] for i in range(users)], peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=["1x1", "2x2", "4x4", "8x4"], help="USERSxPHOTOS each")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright
    chromium = shutil.which("chromium") or sys.exit("needs Debian's chromium: apt-get install chromium")
    settings = [tuple(int(n) for n in s.split("x")) for s in args.settings]
    photos = flickr_images(1 + max(u * e for u, e in settings))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"# dashboard_load: {machine()}")
    rows = []
    with Others():   # closed after the server and the browser are reaped, so their CPU counts as ours
        server = start_server(port)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
                url = f"http://127.0.0.1:{port}"
                warm, _ = run_setting(browser, url, photos[-1:], 1, 1, server.pid)   # loads the models once
                print(f"# warm-up (model load + 1 photo): {warm[0]:.1f} s")
                for users, each in settings:
                    seconds, peak = run_setting(browser, url, photos, users, each, server.pid)
                    rows.append([users, each, f"{min(seconds):.1f}-{max(seconds):.1f}",
                                 f"{users * each / max(seconds):.2f}", f"{peak:,.0f}"])
                browser.close()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    table("Dashboard under load (built-in model, segmentation off, one server)",
          ["people", "photos each", "s per page (uploads to all captions)", "photos/s", "server peak RSS MB"], rows)


if __name__ == "__main__":
    main()
