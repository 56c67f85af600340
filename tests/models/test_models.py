"""Decoders: shapes, the packed/sorted training pass against a plain step-by-step pass, attention sums."""
import pytest
import torch

from captioning.models.decoders import AttentionDecoder, build_decoder, caption_loss
from captioning.config import ModelConfig
from captioning.data.vocab import END, PAD, START


def make_batch(b=5, vocab=20, cells=6, channels=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 4, 7][:b])
    captions = torch.full((b, int(lengths.max())), PAD)
    for i, n in enumerate(lengths.tolist()):
        captions[i, 0], captions[i, n - 1] = START, END
        captions[i, 1:n - 1] = torch.randint(4, vocab, (n - 2,), generator=g)
    grid = torch.randn(b, cells, channels, generator=g)
    return grid, captions, lengths


def stepwise_loss(decoder, features, captions, lengths):
    """Reference: run `step` one token at a time per caption, no packing, no sorting."""
    logits, targets = [], []
    for i in range(len(lengths)):
        state = decoder.init_state(features[i:i + 1])
        for t in range(int(lengths[i]) - 1):
            out, state, _ = decoder.step(captions[i:i + 1, t], state)
            logits.append(out)
            targets.append(captions[i, t + 1:t + 2])
    return caption_loss(torch.cat(logits), torch.cat(targets))


def test_training_pass_equals_step_by_step_for_both_decoders():
    grid, captions, lengths = make_batch()
    for name, feats in (("lstm", grid.mean(1)), ("attention", grid)):
        torch.manual_seed(0)
        decoder = build_decoder(ModelConfig(decoder=name, vocab_size=20, feat_dim=8, embed_dim=16, hidden_dim=16,
                                            attention_dim=8, dropout=0.0)).eval()
        logits, targets, _ = decoder(feats, captions, lengths)
        assert len(targets) == int((lengths - 1).sum())  # no padded position is projected
        fast = caption_loss(logits, targets)
        assert torch.allclose(fast, stepwise_loss(decoder, feats, captions, lengths), atol=1e-5), name


def test_attention_weights_sum_to_one_and_padding_gets_none():
    grid, captions, lengths = make_batch()
    decoder = AttentionDecoder(ModelConfig(decoder="attention", vocab_size=20, feat_dim=8, embed_dim=16,
                                           hidden_dim=16, attention_dim=8)).eval()
    _, _, alphas = decoder(grid, captions, lengths)
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


def test_feature_norm_standardises():
    decoder = build_decoder(ModelConfig(decoder="lstm", vocab_size=10, feat_dim=3))
    decoder.norm.set_stats([1.0, 2.0, 3.0], [2.0, 2.0, 0.0])
    out = decoder.norm(torch.tensor([[3.0, 2.0, 3.0]]))
    assert torch.allclose(out, torch.tensor([[1.0, 0.0, 0.0]]))  # std 0 is clamped, not a division by zero


def test_ensemble_of_one_is_the_model_and_of_two_is_the_mean_probability():
    from captioning.models.decoders import Ensemble
    from captioning.config import SearchConfig
    from captioning.search.torch_search import beam_search
    grid, captions, lengths = make_batch()
    cfg = dict(vocab_size=20, feat_dim=8, embed_dim=16, hidden_dim=16, attention_dim=8, dropout=0.0)
    torch.manual_seed(0)
    att, lstm = (build_decoder(ModelConfig(decoder=d, **cfg)).eval() for d in ("attention", "lstm"))
    search = SearchConfig(beam_size=3)
    alone = [h[0].tokens for h in beam_search(att, grid, search)]
    assert [h[0].tokens for h in beam_search(Ensemble([att]), grid, search)] == alone

    both = Ensemble([att, lstm])
    assert both.uses_grid                                    # the lstm member gets the grid's mean
    state = both.init_state(grid)
    tokens = torch.full((len(grid),), START)
    logp, _, alpha = both.step(tokens, state)
    a, _, _ = att.step(tokens, att.init_state(grid))
    b, _, _ = lstm.step(tokens, lstm.init_state(grid.mean(1)))
    expected = ((a.log_softmax(-1).exp() + b.log_softmax(-1).exp()) / 2).log()
    assert torch.allclose(logp, expected, atol=1e-5)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(len(grid)), atol=1e-5)
    assert torch.allclose(alpha.sum(-1), torch.ones(len(grid)), atol=1e-5)  # only the attention member's


@pytest.mark.parametrize("decoder", ["attention", "lstm"])
def test_mirror_pair_averages_the_two_readings_and_shows_the_plain_ones_attention(decoder):
    """MirrorPair: features [B, P, 2C] = the photo's and its mirror image's; word probabilities are the mean
    of the decoder's on each half; two equal halves give exactly the plain decoder's search."""
    from captioning.models.decoders import MirrorPair
    from captioning.config import SearchConfig
    from captioning.search.torch_search import beam_search
    grid, _, _ = make_batch()
    mirrored = torch.randn(grid.shape, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    d = build_decoder(ModelConfig(decoder=decoder, vocab_size=20, feat_dim=8, embed_dim=16, hidden_dim=16,
                                  attention_dim=8, dropout=0.0)).eval()
    if not d.uses_grid:
        grid, mirrored = grid.mean(1), mirrored.mean(1)
    pair = MirrorPair(d)
    tokens = torch.full((len(grid),), START)
    logp, _, alpha = pair.step(tokens, pair.init_state(torch.cat([grid, mirrored], -1)))
    a, _, plain_alpha = d.step(tokens, d.init_state(grid))
    b, _, _ = d.step(tokens, d.init_state(mirrored))
    assert torch.allclose(logp.exp(), (a.softmax(-1) + b.softmax(-1)) / 2, atol=1e-6)
    assert (alpha is None) == (plain_alpha is None)
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
    from captioning.models.decoders import FusedMirror, align_mirror
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
