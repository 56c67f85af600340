"""Beam and greedy search on real trained models: optimality against greedy, constraints, batching."""
import pytest
import torch

from captioning.inference.captioner import Captioner
from captioning.training.checkpoint import BUILTIN
from captioning.config import SearchConfig
from captioning.search.torch_search import _banned_trigrams, beam_search, greedy_search, sequence_logprob
from captioning.features.store import load_features
from captioning.features.prepare import prepare
from captioning.data.vocab import END, UNK


def test_trigram_mask():
    seqs = torch.tensor([[5, 6, 7, 5, 6], [5, 6, 7, 8, 9]])
    banned = _banned_trigrams(seqs, 10)
    assert banned[0].nonzero().flatten().tolist() == [7]   # "5 6 7" seen, sequence ends "5 6"
    assert not banned[1].any()


def _test_feats(model, shapes_data, n=16):
    workdir, best = model
    captioner = Captioner.load(best, device="cpu")
    from captioning.config import ExtractConfig
    _, records, store = prepare(shapes_data, workdir, captioner.spec, ExtractConfig(device="cpu"))
    rows = torch.tensor([store.row_of()[str(r.image)] for r in records if r.split == "test"][:n])
    return captioner, load_features(store, rows, captioner.decoder.uses_grid, captioner.device)


def test_beam_finds_at_least_greedy_logprob(attention_model, lstm_model, shapes_data):
    for model in (attention_model, lstm_model):
        captioner, feats = _test_feats(model, shapes_data)
        decoder = captioner.decoder
        greedy = greedy_search(decoder, feats, block_trigrams=False)
        beams = beam_search(decoder, feats, SearchConfig(beam_size=4, length_alpha=0.0, block_trigrams=False))
        for i, (g, b) in enumerate(zip(greedy, beams)):
            lp_g = sequence_logprob(decoder, feats[i:i + 1], g.tokens)
            lp_b = sequence_logprob(decoder, feats[i:i + 1], b[0].tokens)
            assert abs(lp_b - b[0].logprob) < 1e-3          # the score search reports is the model's
            assert lp_b >= lp_g - 1e-4


def test_batched_beam_equals_one_image_at_a_time(attention_model, shapes_data):
    captioner, feats = _test_feats(attention_model, shapes_data, n=6)
    cfg = SearchConfig(beam_size=3)
    batched = beam_search(captioner.decoder, feats, cfg)
    for i in range(len(feats)):
        single = beam_search(captioner.decoder, feats[i:i + 1], cfg)[0]
        assert single[0].tokens == batched[i][0].tokens
        assert abs(single[0].score - batched[i][0].score) < 1e-4


class CountingDecoder:
    """A decoder as search sees it, counting the rows each step runs on."""

    def __init__(self, decoder):
        self.decoder, self.rows = decoder, []
        self.per_image = decoder.per_image

    def init_state(self, features):
        return self.decoder.init_state(features)

    def step(self, tokens, state):
        self.rows.append(tokens.shape[0])
        return self.decoder.step(tokens, state)


@pytest.mark.slow
def test_a_finished_image_leaves_the_batch():
    """Batched search runs the decoder on exactly the rows one-image-at-a-time search would (an image whose
    captions are done costs nothing more), and what every image gets is unchanged by its neighbours. The
    built-in Flickr8k decoder on random grids: captions of many lengths, so images finish at different steps."""
    captioner = Captioner.load(BUILTIN, device="cpu")
    norm = captioner.decoder.norm
    feats = torch.randn(12, 49, norm.mean.shape[0], generator=torch.Generator().manual_seed(0)) * norm.std + norm.mean
    cfg = SearchConfig(beam_size=3, num_captions=2)
    counting = CountingDecoder(captioner.decoder)
    batched = beam_search(counting, feats, cfg, keep_alphas=True)
    batched_rows, steps = sum(counting.rows), len(counting.rows)
    single_steps, single_rows = [], 0
    for i in range(len(feats)):
        counting.rows = []
        single = beam_search(counting, feats[i:i + 1], cfg, keep_alphas=True)[0]
        single_steps.append(len(counting.rows))
        single_rows += sum(counting.rows)
        assert [h.tokens for h in single] == [h.tokens for h in batched[i]]
        for a, b in zip(single, batched[i]):
            assert abs(a.score - b.score) < 1e-4
            assert torch.allclose(a.alphas, b.alphas, atol=1e-5)
    assert steps == max(single_steps) and min(single_steps) < steps   # images finish at different steps
    assert batched_rows == single_rows == sum(1 + 3 * (s - 1) for s in single_steps)   # one row a photo first


def test_constraints_num_captions_and_attention(attention_model, shapes_data):
    captioner, feats = _test_feats(attention_model, shapes_data, n=4)
    cfg = SearchConfig(beam_size=5, num_captions=3, max_len=12)
    results = beam_search(captioner.decoder, feats, cfg, keep_alphas=True)
    for hyps in results:
        assert len(hyps) == 3
        assert len({tuple(h.tokens) for h in hyps}) == 3                # distinct
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            assert UNK not in h.tokens and 1 <= len(h.tokens) <= 11
            assert h.alphas.shape[0] >= len(h.tokens)
            assert torch.allclose(h.alphas.sum(-1), torch.ones(h.alphas.shape[0]), atol=1e-4)


def test_captioning_sees_the_features_training_saw(attention_model, shapes_data):
    """A photo captioned from disk gets the features extraction cached for training, to fp16 rounding
    (same transform, same encoder with its BatchNorm folded), so the decoder meets what it trained on."""
    from captioning.features.images import load_image
    from captioning.config import ExtractConfig
    workdir, best = attention_model
    captioner = Captioner.load(best, device="cpu")
    _, records, store = prepare(shapes_data, workdir, captioner.spec, ExtractConfig(device="cpu"))
    paths = [store.paths[i] for i in (0, 7)]
    live = captioner.encode([load_image(p) for p in paths])
    cached = load_features(store, torch.tensor([0, 7]), True, "cpu").float()
    assert torch.allclose(live, cached, rtol=2e-3, atol=2e-3)


def test_diverse_captions_differ_and_the_first_is_plain_beam_search():
    from captioning.search.numpy_search import MIN_DISTANCE, word_distance
    from captioning.search.torch_search import search
    captioner = Captioner.load(BUILTIN, device="cpu")
    torch.manual_seed(0)
    feats = torch.randn(6, 49, captioner.config.feat_dim) * 2 + 1
    plain = beam_search(captioner.decoder, feats, SearchConfig(beam_size=3))
    cfg = SearchConfig(beam_size=3, num_captions=3)
    diverse = search(captioner.decoder, feats, cfg)
    assert search(captioner.decoder, feats, cfg)[0][1].tokens == diverse[0][1].tokens   # seeded: reproducible
    distances = []
    for p, d in zip(plain, diverse):
        assert len(d) == 3 and d[0].tokens == p[0].tokens and d[0].score == p[0].score
        assert len({tuple(h.tokens) for h in d}) == 3
        assert all(END not in h.tokens and UNK not in h.tokens and h.tokens for h in d)
        distances += [word_distance(set(a.tokens), set(b.tokens)) for i, a in enumerate(d) for b in d[i + 1:]]
    beams = search(captioner.decoder, feats, SearchConfig(beam_size=3, num_captions=3, diversity="beam"))
    beam_distances = [word_distance(set(a.tokens), set(b.tokens)) for d in beams for i, a in enumerate(d)
                      for b in d[i + 1:]]
    assert sum(distances) / len(distances) > sum(beam_distances) / len(beam_distances)
    assert sum(d >= MIN_DISTANCE for d in distances) >= len(distances) // 2


def test_the_first_step_runs_one_row_a_photo_and_finished_photos_leave_by_swapping():
    """All K beams start from <start> alike, so the first step runs one decoder row per photo, later ones K; a
    photo that finishes leaves by a going photo's rows moving into its place. Neither changes any photo's
    captions: the same whether the photos are searched together, in reverse order or in pairs."""
    captioner = Captioner.load(BUILTIN, device="cpu")
    norm = captioner.decoder.norm
    feats = torch.randn(8, 49, norm.mean.shape[0], generator=torch.Generator().manual_seed(1)) * norm.std + norm.mean
    cfg = SearchConfig(beam_size=4, num_captions=2)
    counting = CountingDecoder(captioner.decoder)
    together = beam_search(counting, feats, cfg)
    assert counting.rows[0] == 8 and counting.rows[1] == 8 * 4 and all(r % 4 == 0 for r in counting.rows[1:])
    assert min(counting.rows[1:]) < 8 * 4                  # a photo left while others went on: in one of the two
    reverse = beam_search(captioner.decoder, feats.flip(0), cfg)[::-1]   # orders it was not the last one
    pairs = [h for i in range(0, 8, 2) for h in beam_search(captioner.decoder, feats[i:i + 2], cfg)]
    for a, b, c in zip(together, reverse, pairs):
        assert [h.tokens for h in a] == [h.tokens for h in b] == [h.tokens for h in c]
        assert all(abs(x.score - y.score) < 1e-4 for x, y in zip(a, b))


@pytest.mark.parametrize("runtime", ["torch", "numpy"])
def test_leaving_photos_keep_the_going_photos_rows(runtime):
    """The image-only state after some photos finish holds, K rows each, exactly the going photos' rows, in
    the order the search goes on with; after the first step each photo's single row is repeated K times."""
    import numpy as np
    from captioning.search import numpy_search as npsearch
    from captioning.search import torch_search as search
    n, k, going = 6, 3, [0, 2, 4, 5]
    rows = np.arange(n * k * 2, dtype=np.float32).reshape(n * k, 2)
    if runtime == "torch":
        keep, wrap, back = search._keep, torch.from_numpy, lambda v: v.numpy()
    else:
        keep, wrap, back = npsearch.keep, (lambda v: v), (lambda v: v)
    order, fixed = keep(going, n, k, k, {"x": wrap(rows.copy())})
    assert order == [0, 4, 2, 5]           # 0 and 2 stay; 4 and 5 move into finished 1's and 3's places
    assert (back(fixed["x"]) == rows.reshape(n, k, 2)[order].reshape(-1, 2)).all()
    order, fixed = keep([1, 3], n, 1, k, {"x": wrap(rows[:n].copy())})
    assert order == [1, 3] and (back(fixed["x"]) == np.repeat(rows[[1, 3]], k, 0)).all()
    assert npsearch.keep_order([1, 2], 4) == [2, 1] and npsearch.keep_order([0, 1, 2, 3], 4) == [0, 1, 2, 3]


def test_a_photo_stops_once_it_has_its_captions_unless_told_otherwise():
    """stop_early (the default): a photo's search ends at the step at which its K-th caption finishes, even
    when a live beam might still beat them; --no-stop-early waits for that beam, as the search did before.
    `done` is shared by the torch and numpy searches (tests/deploy/test_onnx.py: the same captions)."""
    from captioning.search.numpy_search import Hypothesis, done
    hyps = [Hypothesis([5], -3.0, -3.0), Hypothesis([6], -2.0, -2.0)]
    assert SearchConfig().stop_early
    assert done(hyps, -1.0, 2, 3, SearchConfig())                                  # a live beam at -1 may win
    assert not done(hyps, -1.0, 2, 3, SearchConfig(stop_early=False))
    assert done(hyps, -90.0, 2, 3, SearchConfig(stop_early=False))                 # none can: done either way
    assert not done(hyps[:1], -9.0, 2, 3, SearchConfig())                           # not yet K captions
    captioner = Captioner.load(BUILTIN, device="cpu")
    norm = captioner.decoder.norm
    feats = torch.randn(6, 49, norm.mean.shape[0], generator=torch.Generator().manual_seed(2)) * norm.std + norm.mean
    rows, found = {}, {}
    for stop in (True, False):
        counting = CountingDecoder(captioner.decoder)
        found[stop] = beam_search(counting, feats, SearchConfig(beam_size=4, num_captions=4, diversity="beam",
                                                                stop_early=stop))
        rows[stop] = sum(counting.rows)
    assert rows[True] < rows[False]                   # some photo's search went on past its 4 captions before
    assert all(len(h) == 4 for h in found[True])
