"""Downloading from Kaggle, with kagglehub patched at its one call: tests never touch the network; what
the download returns is real dataset folders, loaded and checked as a real download would be. Then the
`download` command with only kagglehub's HTTP calls replaced: offline, refused, interrupted, never half a
dataset."""
import errno
import io
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from captioning.data.download import HANDLES, download_dataset
from captioning.data.synthetic import make_shapes_dataset
from captioning.utils import CaptioningError
from tests.helpers import error_line, make_flickr, make_mini_coco

@pytest.fixture
def kaggle(monkeypatch, tmp_path):
    import kagglehub
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle-cache"))
    calls = []

    def patch(fn):
        def fake(handle, path=None, *, force_download=False, output_dir=None):
            calls.append((handle, force_download))
            return fn(handle)
        monkeypatch.setattr(kagglehub, "dataset_download", fake)
        return calls
    return patch


def test_download_success(tmp_path, kaggle):
    folder = tmp_path / "versions" / "1"
    make_flickr(folder / "flickr8k", ["1_a.jpg", "2_b.jpg", "3_c.jpg"])  # nested, as Kaggle folders often are
    calls = kaggle(lambda handle: str(folder))
    assert download_dataset("flickr8k", force=True) == folder
    assert calls == [("adityajn105/flickr8k", True)]


def test_download_connection_error(kaggle):
    import requests

    def fail(handle):
        raise requests.exceptions.ConnectionError("Max retries exceeded")
    kaggle(fail)
    with pytest.raises(CaptioningError, match="internet connection"):
        download_dataset("mini-coco")


def test_download_offline_uses_cached_version(tmp_path, kaggle):
    import requests
    cached = tmp_path / "kaggle-cache" / "datasets" / HANDLES["mini-coco"] / "versions" / "2"
    make_mini_coco(cached)

    def offline(handle):
        if handle.endswith("/versions/2"):
            return str(cached)
        raise requests.exceptions.ConnectionError("offline")
    kaggle(offline)
    assert download_dataset("mini-coco") == cached


def test_download_http_error_reports_status(kaggle):
    import requests
    from kagglehub.exceptions import KaggleApiHTTPError

    def refuse(handle):
        response = requests.Response()
        response.status_code = 403
        raise KaggleApiHTTPError("403 Client Error.\n\nYou don't have permission", response=response)
    kaggle(refuse)
    with pytest.raises(CaptioningError, match="403") as e:
        download_dataset("flickr8k")
    assert "\n" not in str(e.value)


def test_download_other_failure_is_one_line(kaggle):
    def broken(handle):
        raise OSError("No space left on device\nmore detail")
    kaggle(broken)
    with pytest.raises(CaptioningError, match="No space left on device") as e:
        download_dataset("flickr8k")
    assert "\n" not in str(e.value)


def test_download_that_does_not_load(tmp_path, kaggle):
    half = tmp_path / "half"
    (half / "Images").mkdir(parents=True)
    kaggle(lambda handle: str(half))
    with pytest.raises(CaptioningError, match="--force"):
        download_dataset("flickr8k")


def test_download_unknown_name():
    with pytest.raises(CaptioningError, match="mini-coco, flickr8k"):
        download_dataset("imagenet")


# ---- downloads: offline, refused, interrupted; never half a dataset ------------------------------------

@pytest.fixture
def kaggle_http(monkeypatch, tmp_path):
    """The real kagglehub (cache, completion markers, archive extraction) with its HTTP calls replaced.
    `net.online`, `net.status` (an HTTP error), `net.archive` (bytes served), `net.cut_at` (bytes served before
    the connection breaks) and `net.extract_fails` (stop the archive's extraction half-way) steer it."""
    import requests
    from kagglehub import http_resolver
    from kagglehub.exceptions import KaggleApiHTTPError
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle-cache"))
    net = SimpleNamespace(online=True, status=None, archive=b"", cut_at=None, extract_fails=None)

    def check():
        if not net.online:
            raise requests.exceptions.ConnectionError("HTTPSConnectionPool(host='www.kaggle.com', port=443): "
                                                      "Max retries exceeded")
        if net.status:
            response = requests.Response()
            response.status_code = net.status
            raise KaggleApiHTTPError(f"{net.status} Client Error.\n\nmore lines", response=response)

    def current_version(client, handle):
        check()
        return 3

    class Response:
        headers, url = {}, "https://storage.example/archive.zip"

    def call(fn, handle=None):
        check()
        return Response()

    def download_file(response, out_file, handle, cached_path=None, **kwargs):
        data = net.archive if net.cut_at is None else net.archive[:net.cut_at]
        with open(out_file, "wb") as f:
            f.write(data)
        if net.cut_at is not None:
            raise requests.exceptions.ChunkedEncodingError("('Connection broken: IncompleteRead(1024 bytes read, "
                                                           "9000 more expected)')")
        return True

    real_extract = http_resolver._extract_archive

    def extract(archive_path, out_path):
        if net.extract_fails is None:
            return real_extract(archive_path, out_path)
        with zipfile.ZipFile(archive_path) as z:              # half the files, then the failure
            names = z.namelist()
            z.extractall(out_path, names[: len(names) // 2])
        raise net.extract_fails

    monkeypatch.setattr(http_resolver, "_get_current_version", current_version)
    monkeypatch.setattr(http_resolver, "handle_call", call)
    monkeypatch.setattr(http_resolver, "download_file", download_file)
    monkeypatch.setattr(http_resolver, "_extract_archive", extract)
    return net


def zipped_dataset(tmp_path):
    folder = make_shapes_dataset(tmp_path / "served", n_images=6, size=32)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        # Annotations first: an archive cut short then holds a folder that looks like a dataset.
        for p in sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: (p.suffix != ".json", p)):
            z.write(p, p.relative_to(folder).as_posix())
    return buffer.getvalue()


def test_a_broken_download_is_never_taken_for_a_whole_one(tmp_path, kaggle_http, run_main):
    net = kaggle_http
    net.archive = zipped_dataset(tmp_path)
    version = tmp_path / "kaggle-cache" / "datasets" / "adityajn105" / "flickr8k" / "versions" / "3"

    net.cut_at = 1024                                   # the connection breaks mid-way
    code, out, err = run_main("download", "--dataset", "flickr8k")
    assert code == 1 and out == ""
    line = error_line(err)
    assert "interrupted" in line and "run the download again" in line

    net.cut_at, net.extract_fails = None, KeyboardInterrupt   # Ctrl-C while the archive is unpacked
    code, out, err = run_main("download", "--dataset", "flickr8k")
    assert code == 1 and out == "" and "Interrupted" in err and "Traceback" not in err
    assert (version / "captions.json").exists()        # half a folder lies there, loadable on its own...
    assert 0 < len(list((version / "Images").iterdir())) < 6

    net.online = False                                 # ... and offline it must not be served as the dataset
    code, out, err = run_main("download", "--dataset", "flickr8k")
    assert code == 1 and out == ""
    assert "Could not reach Kaggle" in error_line(err)

    net.extract_fails = OSError(errno.ENOSPC, "No space left on device")   # the disk fills while unpacking
    net.online = True
    code, out, err = run_main("download", "--dataset", "flickr8k")
    assert code == 1 and "No space left on device" in error_line(err)

    net.extract_fails = None                           # a whole download at last
    code, out, err = run_main("download", "--dataset", "flickr8k")
    assert code == 0, err
    assert Path(out.strip()) == version
    net.online = False                                 # ... which offline is served from the cache
    code, out, err = run_main("download", "--dataset", "flickr8k")
    assert code == 0 and Path(out.strip()) == version and "cached copy" in err


@pytest.mark.parametrize("status, words", [(404, "no such dataset"), (403, "no permission"),
                                           (401, "credentials"), (500, "HTTP status 500")])
def test_http_errors_are_one_sentence(kaggle_http, run_main, status, words):
    kaggle_http.status = status
    code, out, err = run_main("download")
    line = error_line(err)
    assert code == 1 and out == "" and str(status) in line and words in line
