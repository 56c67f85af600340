"""Datasets from Kaggle through kagglehub: download (or reuse kagglehub's cache, offline too), then check
that what arrived loads, so a broken download is reported here and not at training time.

No torch here, and kagglehub only inside the function: the menu imports this module.
"""
import os
from pathlib import Path

from captioning.data.datasets import load_dataset
from captioning.utils import CaptioningError, console

HANDLES = {
    "mini-coco": "nagasai524/mini-coco2014-dataset-for-image-captioning",
    "flickr8k": "adityajn105/flickr8k",
}

def download_dataset(name="mini-coco", force=False):
    """Download (or reuse from kagglehub's cache) a dataset from Kaggle; returns its folder, checked to load."""
    if name not in HANDLES:
        raise CaptioningError(f"Unknown dataset '{name}': choose one of {', '.join(HANDLES)}.")
    handle = HANDLES[name]
    import kagglehub  # lazy: it pulls in requests and more, which the menu's first screen doesn't need
    import requests
    from kagglehub.exceptions import KaggleApiHTTPError

    try:
        try:
            path = kagglehub.dataset_download(handle, force_download=force)
        except requests.exceptions.ConnectionError:
            # An unversioned handle asks the API for the latest version even when the data is cached;
            # offline, a versioned handle is served from the cache. Fall back to the newest cached version.
            path = _cached_download(kagglehub, handle) if not force else None
            if path is None:
                raise
            console.print(f"[yellow]Kaggle is unreachable; using the cached copy in {path}.[/]")
    except requests.exceptions.ConnectionError:
        raise CaptioningError(f"Could not reach Kaggle to download {handle}: check your internet connection.") from None
    except (KaggleApiHTTPError, requests.exceptions.HTTPError) as e:
        status = getattr(e.response, "status_code", None) or "unknown"
        why = {401: ": it asks for Kaggle credentials", 403: ": no permission; the dataset may be private, or its "
               "terms must be accepted on kaggle.com first", 404: ": no such dataset (renamed or removed?)",
               429: ": too many requests; try again later"}.get(status, "")
        raise CaptioningError(f"Kaggle refused the download of {handle} (HTTP status {status}){why}.") from None
    except requests.exceptions.RequestException as e:  # the connection broke mid-way, a timeout, ...
        detail = (str(e).strip().splitlines() or [""])[0][:160]
        raise CaptioningError(f"The download of {handle} was interrupted ({type(e).__name__}: {detail}); "
                              "run the download again.") from None
    except Exception as e:  # kagglehub raises many kinds (disk full, bad archive, ...): keep the message to one line
        detail = (str(e).strip().splitlines() or [""])[0]
        raise CaptioningError(f"Downloading {handle} from Kaggle failed: {type(e).__name__}: {detail}") from None

    path = Path(path)
    try:
        load_dataset(path)
    except CaptioningError as e:
        raise CaptioningError(f"The download in {path} is incomplete or not a dataset ({str(e).rstrip('.')}); "
                              f"run the download again with --force.") from None
    return path


def _cached_download(kagglehub, handle):
    """The newest version of `handle` that kagglehub's cache can serve without the network, or None."""
    cache = Path(os.environ.get("KAGGLEHUB_CACHE", Path.home() / ".cache" / "kagglehub"))
    versions = cache / "datasets" / handle / "versions"
    numbers = sorted((int(p.name) for p in versions.glob("*") if p.is_dir() and p.name.isdigit()), reverse=True)
    for n in numbers:
        try:
            return kagglehub.dataset_download(f"{handle}/versions/{n}")
        except Exception:
            continue
    return None
