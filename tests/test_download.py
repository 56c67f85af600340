"""Downloading from Kaggle, with kagglehub patched at its one call: tests never touch the network; what
the download returns is real dataset folders, loaded and checked as a real download would be."""
import pytest

from captioning.download import HANDLES, download_dataset
from captioning.utils import CaptioningError
from tests.test_datasets import make_flickr, make_mini_coco


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
