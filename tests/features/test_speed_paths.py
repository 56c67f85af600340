"""The fast paths give the plain paths' results: features (calibrated settings, background decoding,
uint8 transport, JPEG draft decoding), batched beam search, and bucketed / image-grouped / packed training
batches. The plain references live in bench/naive.py, which the benchmarks time against the same code."""
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from bench.naive import naive_loss, one_at_a_time_beam, plain_extract
from captioning.features import decoding, extract as features
from captioning.features import tuning
from captioning.features.encoders import EncoderSpec, build_encoder
from captioning.features.images import load_image
from captioning.config import ExtractConfig
from captioning.features.decoding import Preprocess
from captioning.features.extract import extract_features
from captioning.config import ModelConfig
from captioning.models.decoders import build_decoder
from captioning.config import SearchConfig
from captioning.search.torch_search import beam_search
from captioning.data.synthetic import make_shapes_dataset
from captioning.features.tuning import calibrate, fold_batchnorm
from captioning.config import TrainConfig
from captioning.training.objectives import decoder_loss, image_batches, length_buckets
from captioning.data.vocab import END, PAD, START

SPEC = EncoderSpec("resnet18", weights=None)
N = 12


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_images=N, seed=1)
    return sorted((root / "Images").glob("*.jpg"))


@pytest.fixture(scope="module")
def plain(paths):
    """Features the plain way: one image at a time, the encoder's own transform, default memory format."""
    trunk, transform = build_encoder(SPEC)
    grid, pooled = np.zeros((N, 49, 512), np.float16), np.zeros((N, 512), np.float16)
    plain_extract(paths, trunk, transform, grid, pooled)
    return grid, pooled


def assert_close_fp16(actual, expected):
    """Equal up to fp16 rounding (relative 2^-11) plus float32 reordering noise from other batch sizes
    and layouts (oneDNN picks different kernels; sums run in a different order)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=2e-3, atol=1e-3 * scale)


# --- features ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "resnet50"])
def test_folding_batchnorm_keeps_the_outputs(name):
    """Every BatchNorm of the encoders is folded into its convolution, and the outputs stay equal up to
    float32 rounding. Random-init BatchNorm is the identity, so give each one real-looking statistics."""
    trunk, _ = build_encoder(EncoderSpec(name, weights=None))
    g = torch.Generator().manual_seed(0)
    for m in trunk.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    x = torch.randn(2, 3, 224, 224, generator=g)
    with torch.inference_mode():
        expected = trunk(x)
        folded = fold_batchnorm(trunk)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_split_transform_is_bitwise_the_encoders_transform(paths):
    """Decode+resize+crop per image as uint8, then float+normalise per batch: exactly the transform's
    arithmetic, in either memory layout."""
    _, transform = build_encoder(SPEC)
    prep = Preprocess(transform)
    assert prep.split
    images = [prep.image(p) for p in paths[:5]]
    assert all(ok for _, ok in images) and images[0][0].dtype == torch.uint8
    expected = torch.stack([transform(load_image(p)) for p in paths[:5]])
    for channels_last in (True, False):
        x = prep.batch(torch.stack([im for im, _ in images]), torch.device("cpu"), channels_last)
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.equal(x, expected)


@pytest.mark.parametrize("cfg", [
    ExtractConfig(device="cpu", batch_size=1, channels_last=False, num_workers=0),   # inline, plain layout
    ExtractConfig(device="cpu", batch_size=5, channels_last=True),                   # ragged last batch
    ExtractConfig(device="cpu", batch_size=16, channels_last=True),                  # one batch larger than N
    ExtractConfig(device="cpu", batch_size=4, channels_last=True, num_workers=1),    # a worker process
    ExtractConfig(device="cpu", batch_size=4, threads=1, decode_threads=2),          # decoding threads beside
], ids=["b1-inline", "b5", "b16", "b4-process", "b4-1thread-2decoders"])            # one compute thread
def test_every_setting_gives_the_plain_features(cfg, paths, plain, tmp_path):
    threads = torch.get_num_threads()
    store = extract_features(paths, SPEC, tmp_path, cfg)
    assert_close_fp16(store.grid, plain[0])
    assert_close_fp16(store.pooled, plain[1])
    assert torch.get_num_threads() == threads  # the extraction's thread count does not leak


def test_background_decoding_yields_the_inline_batches(paths, tmp_path):
    """Threads decoding ahead give the same batches in the same order as decoding inline, bad files
    included; closing the stream early (Ctrl-C in the CNN) stops the threads without waiting for the rest."""
    _, transform = build_encoder(SPEC)
    prep = Preprocess(transform)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(paths[0].read_bytes()[:200])
    files = [str(p) for p in paths[:4]] + [str(broken)] + [str(p) for p in paths[4:]]
    inline = list(decoding._threaded_batches(files, 2, prep, 5, 0))
    assert [rows for rows, _, _ in inline] == [[2, 3, 4, 5, 6], [7, 8, 9, 10, 11], [12]]
    assert inline[0][2] == [True, True, False, True, True]
    for threads in (1, 3):
        ahead = list(decoding._threaded_batches(files, 2, prep, 5, threads))
        assert [(r, ok) for r, _, ok in ahead] == [(r, ok) for r, _, ok in inline]
        assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(ahead, inline))
    stream = decoding._threaded_batches(files, 0, prep, 2, 2)
    next(stream)
    stream.close()


def fake_throughput(best_batch, best_layout=True):
    """A stand-in for timing: throughput peaks at `best_batch` in `best_layout`. Records each call."""
    calls = []

    def measure(trunk, crop, device, batch_size, channels_last, **kw):
        calls.append((batch_size, channels_last))
        peak = 100.0 / (1 + abs(np.log2(batch_size / best_batch)))
        return peak * (1.0 if channels_last == best_layout else 0.8)
    return measure, calls


def test_calibrated_settings_are_used_remembered_and_give_the_plain_features(paths, plain, tmp_path, monkeypatch):
    fake_proc_stat(monkeypatch, 0.0)   # an idle machine, whatever else runs beside the tests
    measure, calls = fake_throughput(best_batch=8)
    monkeypatch.setattr(tuning, "measure_throughput", measure)
    used = []
    real_batches = features.image_batches
    monkeypatch.setattr(features, "image_batches",
                        lambda paths, start, prep, settings, device: used.append(settings) or
                        real_batches(paths, start, prep, settings, device))

    store = extract_features(paths, SPEC, tmp_path, ExtractConfig(device="cpu", calibrate=True))
    assert used[-1].batch_size == 8 and used[-1].channels_last and used[-1].source == "calibrated"
    assert (8, False) in calls                     # the other layout was tried at the best size
    assert (64, True) not in calls                 # the sweep stopped once batches got clearly slower
    remembered = json.loads((tmp_path / "cache" / "calibration.json").read_text())
    key = tuning.calibration_key("resnet18", torch.device("cpu"), torch.get_num_threads())
    assert remembered[key]["batch_size"] == 8 and remembered[key]["channels_last"] is True
    assert_close_fp16(store.grid, plain[0])
    assert_close_fp16(store.pooled, plain[1])

    # The next extraction (other images: no cache to reuse) takes the remembered settings, measures nothing.
    calls.clear()
    extract_features(paths[:7], SPEC, tmp_path, ExtractConfig(device="cpu", calibrate=True))
    assert calls == [] and used[-1].batch_size == 8 and used[-1].source == "remembered"
    # A given batch size wins over the calibration; small jobs do not calibrate by default.
    extract_features(paths[:6], SPEC, tmp_path, ExtractConfig(device="cpu", batch_size=3))
    assert used[-1].batch_size == 3 and used[-1].source == "given"
    extract_features(paths[:5], SPEC, tmp_path / "fresh", ExtractConfig(device="cpu"))
    assert calls == [] and used[-1].source == "default"


def fake_proc_stat(monkeypatch, others_cores):
    """Make CpuShare see other programs keeping `others_cores` cores busy (this process uses one)."""
    clock = itertools.count()
    monkeypatch.setattr(tuning.CpuShare, "_read",
                        staticmethod(lambda: (lambda k: (100.0 + k * (1 + others_cores), 5.0 + k, float(k)))(next(clock))))


def test_cpu_share_counts_only_other_programs(monkeypatch):
    fake_proc_stat(monkeypatch, 0.0)
    assert tuning.CpuShare().threads(2) == 2
    fake_proc_stat(monkeypatch, 1.0)
    assert tuning.CpuShare().threads(2) == 1
    fake_proc_stat(monkeypatch, 6.0)
    share = tuning.CpuShare()
    assert share.others() == pytest.approx(6.0) and share.threads(4) == 1


def test_busy_machine_means_fewer_threads_and_no_calibration(paths, plain, tmp_path, monkeypatch):
    """Next to another busy program: fewer compute threads (spinning OpenMP threads on shared cores are
    slow), no calibration (its timings would mislead and be remembered), the same features; torch's
    thread count is restored afterwards."""
    fake_proc_stat(monkeypatch, 1.0)
    monkeypatch.setattr(tuning, "CALIBRATE_MIN_IMAGES", 1)
    monkeypatch.setattr(tuning, "calibrate", lambda *a, **k: pytest.fail("calibrated on a busy machine"))
    used = []
    real_batches = features.image_batches
    monkeypatch.setattr(features, "image_batches",
                        lambda paths, start, prep, settings, device: used.append(
                            (settings, torch.get_num_threads())) or real_batches(paths, start, prep, settings, device))
    before = torch.get_num_threads()
    store = extract_features(paths, SPEC, tmp_path, ExtractConfig(device="cpu"))
    settings, during = used[-1]
    assert during == max(1, before - 1) == settings.threads and settings.source == "default"
    assert torch.get_num_threads() == before
    assert_close_fp16(store.grid, plain[0])


def test_calibration_measures_for_real_and_picks_the_fastest():
    """The real timing loop on a tiny CNN: a complete, consistent answer (no faked measurements)."""
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU()).eval()
    found = calibrate(trunk, 32, torch.device("cpu"), budget_s=2.0)
    tried = {(b, cl): ips for b, cl, ips in found["tried"]}
    assert (found["batch_size"], found["channels_last"]) in tried
    assert found["images_per_s"] == pytest.approx(max(tried.values()), rel=0.01)
    assert all(ips > 0 for ips in tried.values())


def big_photo(path, seed, size):
    """A large JPEG with photo-like content: gradient, overlapping shapes, sensor noise (fine detail that
    a reduced-size decode can drop)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([c0 + (c1 - c0) * (xx * a + yy * (1 - a)) / max(w, h)
                     for c0, c1, a in rng.uniform(0, 1, (3, 3)) * [255, 255, 1]], -1)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = rng.integers(0, w - 50), rng.integers(0, h - 50)
        box = [x0, y0, x0 + rng.integers(20, 400), y0 + rng.integers(20, 400)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(img, np.float32) + rng.normal(0, 8, (h, w, 3))
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def test_draft_decoding_changes_features_less_than_a_one_pixel_shift(tmp_path):
    """Pillow's draft mode decodes a big JPEG at 1/2..1/8 size (libjpeg's DCT scaling) before the resize:
    several times faster (bench/README.md), but not bit-identical: DCT scaling is a different low-pass
    filter than the bilinear resize. The tolerance: the features must move less than they do when the
    crop window moves by one pixel, a change no one would call a different picture (measured on Flickr8k
    photos with ImageNet mobilenet_v2: draft 4-5%, one-pixel shift 11-15%, bicubic instead of bilinear
    6-8% relative change of the pooled features)."""
    trunk, transform = build_encoder(SPEC)
    prep = Preprocess(transform)

    def feats(img, shift=0):
        img = TF.resize(img, transform.resize_size, interpolation=InterpolationMode.BILINEAR)
        left, top = (img.width - 224) // 2 + shift, (img.height - 224) // 2
        x = TF.normalize(TF.convert_image_dtype(TF.pil_to_tensor(img.crop((left, top, left + 224, top + 224))),
                                                torch.float), transform.mean, transform.std)
        with torch.inference_mode():
            return trunk(x.unsqueeze(0)).flatten(2)[0]            # [C, 49]

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    for seed, size in enumerate([(1600, 1200), (1200, 1600), (4000, 3000)]):
        path = tmp_path / f"{seed}.jpg"
        big_photo(path, seed, size)
        full, draft = load_image(path), load_image(path, prep.draft)
        assert draft.width < full.width / 2 and min(draft.size) >= prep.draft   # reduced, never below the resize
        f_full, f_draft, f_shift = feats(full), feats(draft), feats(full, shift=1)
        assert rel(f_draft, f_full) < rel(f_shift, f_full)                                   # the grid
        assert rel(f_draft.mean(1), f_full.mean(1)) < rel(f_shift.mean(1), f_full.mean(1))  # pooled


# --- search --------------------------------------------------------------------------------------------

def random_decoder(kind, vocab=40, feat=32):
    torch.manual_seed(3)
    decoder = build_decoder(ModelConfig(decoder=kind, vocab_size=vocab, feat_dim=feat, embed_dim=16, hidden_dim=24,
                                        attention_dim=16, context_dim=16, dropout=0.0)).eval()
    with torch.no_grad():
        # Larger weights than the init's: captions that differ by image and in length, and word
        # distributions peaked enough that no two beams tie within float noise.
        for p in decoder.parameters():
            if p.dim() == 2:
                p.mul_(4)
        decoder.out.weight.mul_(25 / 4)
        decoder.out.bias[END] += 3.0
    return decoder


@pytest.mark.parametrize("kind", ["attention", "lstm"])
@pytest.mark.parametrize("cfg", [SearchConfig(beam_size=3), SearchConfig(beam_size=1),
                                 SearchConfig(beam_size=4, num_captions=2, max_len=12)],
                         ids=["beam3", "greedy", "beam4-two-captions"])
def test_batched_search_equals_one_image_at_a_time(kind, cfg):
    decoder = random_decoder(kind)
    torch.manual_seed(4)
    feats = torch.randn(24, 9, 32) if decoder.uses_grid else torch.randn(24, 32)
    batched = beam_search(decoder, feats, cfg)
    single = one_at_a_time_beam(decoder, feats, cfg)
    assert len({tuple(h[0].tokens) for h in batched}) > 5 and len({len(h[0].tokens) for h in batched}) > 2
    for b, s in zip(batched, single):
        assert [h.tokens for h in b] == [h.tokens for h in s]
        assert [h.score for h in b] == pytest.approx([h.score for h in s], abs=1e-4)


# --- training batches ----------------------------------------------------------------------------------

def caption_set(n_images=7, per_image=5, vocab=40, seed=0):
    """Token ids `<start> w.. <end> <pad>..` of varied lengths, padded to the longest; rows = image of each."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 14, (n_images * per_image,), generator=g)
    tokens = torch.full((len(lengths), int(lengths.max())), PAD)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 0], tokens[i, n - 1] = START, END
        tokens[i, 1:n - 1] = torch.randint(4, vocab, (n - 2,), generator=g)
    rows = torch.arange(n_images).repeat_interleave(per_image)
    return tokens, lengths, rows


def grads(decoder):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in decoder.parameters()]


@pytest.mark.parametrize("kind", ["attention", "lstm"])
def test_grouped_and_packed_loss_equals_the_naive_padded_loss(kind):
    """For the same captions: the loss (and its gradient) with image-grouped features and packed /
    shrinking batches equals the plain computation over every padded position, padding ignored."""
    decoder = random_decoder(kind)
    cfg = TrainConfig(att_reg=1.0, label_smoothing=0.0)   # the naive loss has no smoothing
    tokens, lengths, rows = caption_set()
    torch.manual_seed(5)
    images = torch.randn(7, 9, 32) if decoder.uses_grid else torch.randn(7, 32)
    g = torch.Generator().manual_seed(0)
    for idx in image_batches(rows, 15, g) + length_buckets(lengths, 8, g):
        uniq, index = torch.unique(rows[idx], return_inverse=True)
        width = int(lengths[idx].max())
        decoder.zero_grad()
        fast, n = decoder_loss(decoder, images[uniq], tokens[idx, :width], lengths[idx], cfg, index)
        fast.backward()
        fast_grads = grads(decoder)
        decoder.zero_grad()
        naive = naive_loss(decoder, images[rows[idx]], tokens[idx], lengths[idx], cfg.att_reg)
        naive.backward()
        assert n == int((lengths[idx] - 1).sum())
        assert fast.item() == pytest.approx(naive.item(), rel=1e-5)
        for a, b in zip(fast_grads, grads(decoder)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_batchings_cover_every_caption_once():
    tokens, lengths, rows = caption_set(n_images=23)
    g = torch.Generator().manual_seed(0)
    for batches in (image_batches(rows, 12, g), length_buckets(lengths, 12, g)):
        assert sorted(torch.cat(batches).tolist()) == list(range(len(rows)))
    for idx in image_batches(rows, 12, g):     # whole images: every caption of an image in one batch
        assert all(int((rows[idx] == r).sum()) == 5 for r in rows[idx].unique())
    # Buckets are consecutive runs of the captions sorted by length: their spans add up to at most the
    # whole range, so a batch pads only over the few lengths it straddles.
    spans = [int(lengths[idx].max() - lengths[idx].min()) for idx in length_buckets(lengths, 12, g)]
    assert sum(spans) <= int(lengths.max() - lengths.min())
