"""Decoders (models/): every registered decoder, step by step against teacher forcing, search against its
own teacher-forced scores, the mirror reading and ensembles; attention sums, the penalty, feature norms."""
import pytest
import torch

from captioning.config import ModelConfig, SearchConfig
from captioning.data.vocab import END, PAD, START
from captioning.models.attention import AttentionDecoder
from captioning.models.contract import caption_loss
from captioning.models.decoders import DECODERS, build_decoder
from captioning.models.ensemble import Ensemble, MirrorPair
from captioning.search.torch_search import beam_search

SIZES = dict(vocab_size=20, feat_dim=8, embed_dim=16, hidden_dim=16, attention_dim=8, dropout=0.0)


def make_batch(b=5, vocab=20, cells=6, channels=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 4, 7][:b])
    captions = torch.full((b, int(lengths.max())), PAD)
    for i, n in enumerate(lengths.tolist()):
        captions[i, 0], captions[i, n - 1] = START, END
        captions[i, 1:n - 1] = torch.randint(4, vocab, (n - 2,), generator=g)
    grid = torch.randn(b, cells, channels, generator=g)
    return grid, captions, lengths


def make_decoder(name, seed=0, **sizes):
    torch.manual_seed(seed)
    return build_decoder(ModelConfig(decoder=name, **{**SIZES, **sizes})).eval()


def features_for(decoder, grid):
    return grid if decoder.uses_grid else grid.mean(1)


def stepwise(decoder, features, captions, lengths):
    """Reference: run `step` one token at a time per caption, no packing, no sorting: (logits, targets, alphas)."""
    logits, targets, alphas = [], [], []
    for i in range(len(lengths)):
        state = decoder.init_state(features[i:i + 1])
        for t in range(int(lengths[i]) - 1):
            out, state, alpha = decoder.step(captions[i:i + 1, t], state)
            logits.append(out)
            targets.append(captions[i, t + 1:t + 2])
            alphas.append(alpha)
    return torch.cat(logits), torch.cat(targets), alphas


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("context_dim", [0, 12])
def test_teacher_forcing_equals_step_by_step(name, context_dim):
    grid, captions, lengths = make_batch()
    decoder = make_decoder(name, context_dim=context_dim)
    feats = features_for(decoder, grid)
    logits, targets, _ = decoder(feats, captions, lengths)
    assert len(targets) == int((lengths - 1).sum())  # no padded position is projected
    ref_logits, ref_targets, _ = stepwise(decoder, feats, captions, lengths)
    # Packed/sorted order differs from the caption-by-caption order: compare the losses and the sorted logits.
    assert torch.allclose(caption_loss(logits, targets), caption_loss(ref_logits, ref_targets), atol=1e-5), name
    assert torch.allclose(logits.sort(0).values, ref_logits.sort(0).values, atol=1e-5), name


@pytest.mark.parametrize("name", list(DECODERS))
def test_teacher_forcing_with_an_image_index_equals_one_row_per_caption(name):
    """image_index: each image's features once, captions pointing at them, as training batches images."""
    grid, captions, lengths = make_batch()
    decoder = make_decoder(name)
    index = torch.tensor([0, 1, 0, 2, 1])
    feats = features_for(decoder, grid[:3])
    shared, targets, _ = decoder(feats, captions, lengths, index)
    per_row, targets_again, _ = decoder(feats[index], captions, lengths)
    assert torch.equal(targets, targets_again)
    assert torch.allclose(shared, per_row, atol=1e-5)


@pytest.mark.parametrize("name", list(DECODERS))
def test_search_scores_are_the_teacher_forced_log_probabilities_of_its_captions(name):
    """What beam search reports for a caption (its summed log-probability, its attention) is what the
    teacher-forced pass gives for the same words: search's step-by-step state handling loses nothing."""
    grid, _, _ = make_batch()
    decoder = make_decoder(name)
    feats = features_for(decoder, grid)
    cfg = SearchConfig(beam_size=3, num_captions=2, max_len=8)
    results = beam_search(decoder, feats, cfg, keep_alphas=True)
    for i, hyps in enumerate(results):
        for h in hyps:
            words = torch.tensor([[START, *h.tokens, END]])
            logits, targets, alphas = decoder(feats[i:i + 1], words, torch.tensor([words.shape[1]]))
            chosen = logits.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)
            if len(h.tokens) == cfg.max_len - 1:   # out of room: search closes the caption at no cost
                chosen = chosen[:-1]
            logp = chosen.sum()
            assert logp.item() == pytest.approx(h.logprob, abs=1e-4), name
            assert (h.alphas is not None) == decoder.has_attention
            if decoder.has_attention:   # one map per step, <end>'s too
                assert torch.allclose(torch.as_tensor(h.alphas), alphas[0], atol=1e-5)


@pytest.mark.parametrize("name", list(DECODERS))
def test_has_attention_says_whether_step_returns_a_map_and_uses_grid_what_it_reads(name):
    grid, _, _ = make_batch()
    decoder = make_decoder(name)
    cls = DECODERS[name]
    assert decoder.has_attention == cls.has_attention and decoder.uses_grid == cls.uses_grid
    _, _, alpha = decoder.step(torch.full((len(grid),), START), decoder.init_state(features_for(decoder, grid)))
    assert (alpha is not None) == decoder.has_attention
    if alpha is not None:
        assert alpha.shape == grid.shape[:2]
        assert torch.allclose(alpha.sum(-1), torch.ones(len(grid)), atol=1e-5)
    assert Ensemble([decoder]).has_attention == decoder.has_attention
    assert MirrorPair(decoder).has_attention == decoder.has_attention
    assert Ensemble([decoder, make_decoder("lstm")]).has_attention == decoder.has_attention


@pytest.mark.parametrize("name", [n for n, cls in DECODERS.items() if cls.has_attention])
def test_attention_weights_sum_to_one_and_padding_gets_none(name):
    grid, captions, lengths = make_batch()
    _, _, alphas = make_decoder(name)(grid, captions, lengths)
    steps = (lengths.sort(descending=True).values - 1)
    for i, n in enumerate(steps.tolist()):
        assert torch.allclose(alphas[i, :n].sum(-1), torch.ones(n), atol=1e-5)
        assert alphas[i, n:].abs().sum() == 0


def test_attention_penalty_is_the_mean_squared_shortfall_of_each_cells_total():
    """Doubly stochastic attention: each cell's attention summed over the caption should be 1; the penalty is
    the mean over images and cells of (1 - total)², so 0 when every cell gets exactly 1."""
    alphas = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]],    # totals 0.5, 1, 0.5: squares 0.25, 0, 0.25
                           [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])   # totals 1, 0, 1: squares 0, 1, 0
    assert AttentionDecoder.attention_penalty(alphas).item() == pytest.approx(1.5 / 6)
    assert AttentionDecoder.attention_penalty(torch.eye(3).unsqueeze(0)).item() == 0   # each cell once


@pytest.mark.parametrize("name", list(DECODERS))
def test_feature_norm_standardises(name):
    decoder = build_decoder(ModelConfig(decoder=name, vocab_size=10, feat_dim=3))
    decoder.norm.set_stats([1.0, 2.0, 3.0], [2.0, 2.0, 0.0])
    out = decoder.norm(torch.tensor([[3.0, 2.0, 3.0]]))
    assert torch.allclose(out, torch.tensor([[1.0, 0.0, 0.0]]))  # std 0 is clamped, not a division by zero


@pytest.mark.parametrize("name", list(DECODERS))
def test_ensemble_of_one_is_the_model_and_with_lstm_the_mean_probability(name):
    grid, _, _ = make_batch()
    decoder, lstm = make_decoder(name), make_decoder("lstm", seed=1)
    search = SearchConfig(beam_size=3)
    alone = [h[0].tokens for h in beam_search(decoder, features_for(decoder, grid), search)]
    assert [h[0].tokens for h in beam_search(Ensemble([decoder]), features_for(decoder, grid), search)] == alone

    both = Ensemble([decoder, lstm])
    assert both.uses_grid == decoder.uses_grid               # the lstm member gets the grid's mean
    feats = features_for(both, grid)
    tokens = torch.full((len(grid),), START)
    logp, _, alpha = both.step(tokens, both.init_state(feats))
    a, _, plain_alpha = decoder.step(tokens, decoder.init_state(features_for(decoder, grid)))
    b, _, _ = lstm.step(tokens, lstm.init_state(grid.mean(1)))
    expected = ((a.log_softmax(-1).exp() + b.log_softmax(-1).exp()) / 2).log()
    assert torch.allclose(logp, expected, atol=1e-5)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(len(grid)), atol=1e-5)
    assert (alpha is None) == (plain_alpha is None)          # only the attention member's map
    if alpha is not None:
        assert torch.equal(alpha, plain_alpha)


@pytest.mark.parametrize("name", list(DECODERS))
def test_mirror_pair_averages_the_two_readings_and_shows_the_plain_ones_attention(name):
    """MirrorPair: features [B, P, 2C] = the photo's and its mirror image's; word probabilities are the mean
    of the decoder's on each half; two equal halves give exactly the plain decoder's search."""
    grid, _, _ = make_batch()
    mirrored = torch.randn(grid.shape, generator=torch.Generator().manual_seed(1))
    d = make_decoder(name)
    grid, mirrored = features_for(d, grid), features_for(d, mirrored)
    pair = MirrorPair(d)
    tokens = torch.full((len(grid),), START)
    logp, _, alpha = pair.step(tokens, pair.init_state(torch.cat([grid, mirrored], -1)))
    a, _, plain_alpha = d.step(tokens, d.init_state(grid))
    b, _, _ = d.step(tokens, d.init_state(mirrored))
    assert torch.allclose(logp.exp(), (a.softmax(-1) + b.softmax(-1)) / 2, atol=1e-6)
    assert (alpha is None) == (plain_alpha is None) == (not d.has_attention)
    if alpha is not None:
        assert torch.equal(alpha, plain_alpha)
    cfg = SearchConfig(beam_size=3)
    same = [h[0].tokens for h in beam_search(pair, torch.cat([grid, grid], -1), cfg)]
    assert same == [h[0].tokens for h in beam_search(d, grid, cfg)]


@pytest.mark.parametrize("decoder", ["attention", "lstm"])
def test_fused_mirror_reads_the_mean_of_the_photo_and_its_aligned_mirror_image_one_row_a_beam(decoder):
    """FusedMirror: features as MirrorPair takes them; the decoder reads one grid, the photo's averaged with
    the mirror image's flipped back along the width (cell (r, c) of a 2x3 grid over cell (r, 2 - c) of the
    mirror's), so a mirror half that is the photo's grid flipped gives exactly the plain decoder's search,
    at one decoder row per beam."""
    from captioning.models.ensemble import FusedMirror, align_mirror
    from captioning.config import SearchConfig
    from captioning.search.torch_search import beam_search
    grid, _, _ = make_batch()                                        # [5, 6, 8]: a 2x3 grid
    torch.manual_seed(0)
    d = build_decoder(ModelConfig(decoder=decoder, vocab_size=20, feat_dim=8, embed_dim=16, hidden_dim=16,
                                  attention_dim=8, dropout=0.0)).eval()
    flipped = grid.view(5, 2, 3, 8).flip(2).reshape(5, 6, 8)       # what the mirror image's grid looks like
    assert torch.equal(align_mirror(flipped, (2, 3)), grid)
    assert not torch.equal(align_mirror(flipped, (3, 2)), grid)      # the width is the grid's second size
    features = torch.cat([grid, flipped], -1) if d.uses_grid else torch.cat([grid, flipped], -1).mean(1)
    fused = FusedMirror(d, (2, 3))
    assert fused.per_image == d.per_image and fused.uses_grid == d.uses_grid
    other = torch.randn(grid.shape, generator=torch.Generator().manual_seed(1))
    both = torch.cat([grid, other], -1) if d.uses_grid else torch.cat([grid, other], -1).mean(1)
    want = d.init_state(((grid + align_mirror(other, (2, 3))) / 2) if d.uses_grid else (grid + other).mean(1) / 2)
    got = fused.init_state(both)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)

    rows = []
    step = d.step
    d.step = lambda tokens, state: (rows.append(len(tokens)), step(tokens, state))[1]
    cfg = SearchConfig(beam_size=3, num_captions=2, diversity="beam")
    found = [[h.tokens for h in hs] for hs in beam_search(fused, features, cfg)]
    fused_rows, rows[:] = sum(rows), []
    plain = [[h.tokens for h in hs] for hs in beam_search(d, grid if d.uses_grid else grid.mean(1), cfg)]
    assert found == plain and fused_rows == sum(rows)               # the same search, no second reading
