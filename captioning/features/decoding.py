"""Decoding photos for the encoder: the encoder's transform split into a per-image half (decode, resize,
crop as uint8, off the main thread) and a per-batch half (to float, normalise, on the compute device), and
the batches of decoded images extraction and captioning read (background threads on a CPU, worker
processes on a GPU or with --workers N). extract.py runs the CNN over them; tuning.py picks the settings.
"""
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF

from captioning.features.images import draft_size_for, load_image
from captioning.features.tuning import Settings
from captioning.utils import CaptioningError


class Preprocess:
    """The encoder's transform, split in two halves with the same arithmetic as the whole:
    per image, decode + resize + crop (Pillow, off the main thread), kept as uint8 [H, W, 3];
    per batch, to float + normalise (one vectorised op on the compute device).

    uint8 is a quarter of the bytes to move between threads, processes or to the GPU, and a batch of
    [B, H, W, 3] uint8 permuted to [B, 3, H, W] already is channels_last, the CPU's fast layout."""

    def __init__(self, transform, mirror=False):
        self.transform, self.mirror = transform, mirror
        self.split = all(hasattr(transform, a) for a in ("resize_size", "crop_size", "mean", "std", "interpolation"))
        self.crop = int(transform.crop_size[0])
        self.draft = draft_size_for(transform)

    def blank(self):
        shape = (self.crop, self.crop, 3) if self.split else (3, self.crop, self.crop)
        return torch.zeros(shape, dtype=torch.uint8 if self.split else torch.float32)

    def image(self, path):
        """(tensor, True), or (a blank, False) for a file that cannot be read: one bad photo is skipped."""
        try:
            img = load_image(path, self.draft)
        except CaptioningError:
            return self.blank(), False
        if not self.split:
            return self.transform(img), True
        t = self.transform
        img = TF.center_crop(TF.resize(img, t.resize_size, interpolation=t.interpolation,
                                       antialias=getattr(t, "antialias", True)), t.crop_size)
        return torch.from_numpy(np.array(img, dtype=np.uint8)), True

    def batch(self, images, device, channels_last):
        """Stacked images from `image` → the float batch the trunk takes."""
        x = images.to(device, non_blocking=True)
        if self.split:
            x = x.permute(0, 3, 1, 2)
            x = TF.normalize(TF.convert_image_dtype(x, torch.float), self.transform.mean, self.transform.std,
                             inplace=True)
        if self.mirror:
            x = x.flip(-1)   # [B, 3, H, W]: left and right swapped
        return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class ImageFiles(Dataset):
    """Images for DataLoader worker processes (the GPU path, or --workers N)."""

    def __init__(self, paths, prep, start=0):
        self.paths, self.prep, self.start = paths, prep, start

    def __len__(self):
        return len(self.paths) - self.start

    def __getitem__(self, i):
        row = self.start + i
        image, ok = self.prep.image(self.paths[row])
        return row, image, ok


def _worker_init(_):
    torch.set_num_threads(1)  # decoding workers must not steal the compute threads


def _threaded_batches(paths, start, prep, batch_size, threads):
    """(rows, images, ok) batches in row order; `threads` > 0 decode up to two batches ahead in the
    background while the caller runs the CNN, 0 decodes each batch when it is asked for."""
    rows = iter(range(start, len(paths)))
    if threads == 0:
        for r0 in range(start, len(paths), batch_size):
            done = [prep.image(paths[r]) for r in range(r0, min(r0 + batch_size, len(paths)))]
            yield (list(range(r0, r0 + len(done))), torch.stack([d[0] for d in done]), [d[1] for d in done])
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
    pending = deque()

    def fill():
        while len(pending) < 2 * batch_size + threads:
            r = next(rows, None)
            if r is None:
                return
            pending.append((r, pool.submit(prep.image, paths[r])))
    try:
        fill()
        while pending:
            chunk = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            fill()  # keep the decoder busy while this batch is computed
            done = [f.result() for _, f in chunk]
            yield [r for r, _ in chunk], torch.stack([d[0] for d in done]), [d[1] for d in done]
    finally:
        for _, f in pending:
            f.cancel()
        pool.shutdown(wait=True)


def image_batches(paths, start, prep, settings: Settings, device):
    """Batches of decoded images from row `start` on, as (rows, uint8 images, ok flags)."""
    if settings.workers == 0:
        return _threaded_batches(paths, start, prep, settings.batch_size, settings.decode_threads)
    loader = DataLoader(ImageFiles(paths, prep, start), batch_size=settings.batch_size,
                        num_workers=settings.workers, worker_init_fn=_worker_init,
                        pin_memory=device.type == "cuda", prefetch_factor=4)
    return ((rows.tolist(), images, ok.tolist()) for rows, images, ok in loader)


def describe_decoding(s: Settings):
    """How the images are decoded, for the line extraction prints."""
    if s.workers:
        return f"{s.workers} decoding process(es)"
    return f"{s.decode_threads} decoding thread(s)" if s.decode_threads else "decoding inline"
