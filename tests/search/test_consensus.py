"""Consensus re-ranking (consensus.py): the memory a model carries, its neighbours, their vote, and search
with it on a trained model."""
import numpy as np
import pytest
import torch

from captioning.training import checkpoint as ck
from captioning.inference.captioner import Captioner
from captioning.search.consensus import build_memory, memory_from_arrays, pool_config
from captioning.search.numpy_search import Hypothesis
from captioning.config import SearchConfig
from captioning.search.torch_search import beam_search, search
from captioning.utils import CaptioningError
from captioning.data.vocab import END
from tests.helpers import cli

DOG, MAN = [5, 6, 7, 8], [9, 10, 11, 12]     # "a dog runs on grass" / "a man rides a bike", as word ids


def two_kinds(n=30, c=16, seed=0):
    """Training photos of two kinds (features around two directions), each kind with its own captions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2, c)) * 3
    pooled = np.concatenate([centres[k] + rng.normal(size=(n, c)) * 0.3 for k in (0, 1)]).astype(np.float32)
    captions = [[DOG, DOG[:3]]] * n + [[MAN, MAN[1:]]] * n
    return pooled, captions, centres.astype(np.float32)


def hyp(tokens, score=0.0):
    return Hypothesis(list(tokens), score, score)


def test_memory_is_a_pca_of_the_photos_and_every_caption():
    pooled, captions, _ = two_kinds()
    m = build_memory(pooled, captions, dim=8)
    assert m.features.shape == (60, 8) and m.basis.shape == (16, 8) and m.mean.shape == (16,)
    assert np.allclose(m.basis.astype(np.float32).T @ m.basis.astype(np.float32), np.eye(8), atol=2e-3)
    assert np.allclose(np.linalg.norm(m.features.astype(np.float32), axis=1), 1, atol=2e-3)
    assert (m.captions == END).sum() == len(m.owner) == 120 and np.bincount(m.owner).tolist() == [2] * 60
    m.cider()
    assert m.references(0) == [DOG, DOG[:3]] and m.references(59) == [MAN, MAN[1:]]
    assert build_memory(pooled[:5], captions[:5]).features.shape[1] <= 5      # never more dimensions than photos


def test_a_training_photo_finds_itself_first_and_the_scale_does_not_matter():
    pooled, captions, _ = two_kinds()
    m = build_memory(pooled, captions, dim=16)
    assert m.neighbours(pooled, 1)[:, 0].tolist() == list(range(60))
    assert sorted(m.neighbours(pooled[:1] * 7, 5)[0].tolist()) == sorted(m.neighbours(pooled[:1], 5)[0].tolist())
    assert (m.neighbours(pooled[:3], 10) < 30).all()                        # a dog photo's neighbours are dogs


def test_the_neighbours_captions_choose_the_first_caption():
    pooled, captions, centres = two_kinds()
    m = build_memory(pooled, captions, dim=8)
    model_order = [[hyp(MAN, -1.0), hyp(DOG, -2.0)]] * 2                     # the model prefers MAN for both
    near_dog, near_man = m.rerank(model_order, centres, 10)
    assert [h.tokens for h in near_dog] == [DOG, MAN]
    assert [h.tokens for h in near_man] == [MAN, DOG]
    unknown = [[hyp([30, 31], -1.0), hyp([32, 33], -2.0)]]                  # no word in common with anyone:
    assert [h.tokens for h in m.rerank(unknown, centres[:1], 10)[0]] == [[30, 31], [32, 33]]   # the model's order


def test_stored_arrays_round_trip_and_damage_is_one_sentence():
    pooled, captions, _ = two_kinds()
    m = build_memory(pooled, captions, dim=8)
    back = memory_from_arrays(m.to_arrays(), 16)
    assert all(np.array_equal(a, b) for a, b in zip(back.to_arrays().values(), m.to_arrays().values()))
    assert memory_from_arrays({}, 16) is None
    with pytest.raises(ValueError):
        m.check(32)                                                          # another encoder's channels
    arrays = ck.memory_tensors(m)
    arrays["owner"] = arrays["owner"] + 100                                  # captions of photos it does not have
    with pytest.raises(CaptioningError, match="damaged"):
        ck.checkpoint_memory({"memory": arrays}, 16)
    assert ck.checkpoint_memory({}, 16) is None                              # a checkpoint from before: plain search


def test_pool_config_searches_wider_and_keeps_the_users_other_settings():
    cfg = pool_config(SearchConfig(beam_size=3, length_alpha=0.2, num_captions=2))
    assert (cfg.beam_size, cfg.num_captions, cfg.diversity, cfg.length_alpha) == (10, 10, "beam", 0.2)
    assert pool_config(SearchConfig(beam_size=16)).beam_size == 16
    assert pool_config(SearchConfig(rerank_pool=4, num_captions=6)).num_captions == 6


def _val_features(captioner, workdir, shapes_data, n=12):
    from captioning.config import ExtractConfig
    from captioning.features.prepare import prepare
    from captioning.features.store import load_features
    _, records, store = prepare(shapes_data, workdir, captioner.spec, ExtractConfig(device="cpu"))
    rows = torch.tensor([store.row_of()[str(r.image)] for r in records if r.split == "test"][:n])
    return records, load_features(store, rows, captioner.decoder.uses_grid, "cpu")


def test_training_stores_the_memory_and_search_reranks_the_pool(attention_model, shapes_data):
    workdir, best = attention_model
    captioner = Captioner.load(best, device="cpu")
    records, feats = _val_features(captioner, workdir, shapes_data)
    m = captioner.memory
    train = [r for r in records if r.split == "train"]
    assert len(m.features) == len(train) and len(m.owner) == sum(len(r.captions) for r in train)
    cfg = SearchConfig(beam_size=3, mirror=False)
    pool = beam_search(captioner.decoder, feats, pool_config(cfg))
    reranked = captioner.search(feats, cfg)
    rows = m.neighbours(feats.mean(1).numpy(), cfg.neighbours)
    for hyps, got, near in zip(pool, reranked, rows):
        refs = [v for r in near.tolist() for v in m.cider().reference(r, m.references(r))]
        assert got[0].tokens == max(hyps, key=lambda h: m.cider().score(h.tokens, refs)).tokens
    plain = beam_search(captioner.decoder, feats, cfg)
    off = captioner.search(feats, SearchConfig(beam_size=3, mirror=False, rerank=False))
    assert [h[0].tokens for h in off] == [h[0].tokens for h in plain]
    assert [h[0].tokens for h in search(captioner.decoder, feats, cfg)] == [h[0].tokens for h in plain]  # no memory
    three = captioner.search(feats, SearchConfig(beam_size=3, mirror=False, num_captions=3))
    assert [h[0].tokens for h in three] == [h[0].tokens for h in reranked] and all(len(h) == 3 for h in three)


def test_export_keeps_the_memory_and_data_gives_it_to_an_older_model(lstm_model, shapes_data, tmp_path):
    workdir, best = lstm_model
    ckpt = ck.load_checkpoint(best)
    kept = torch.load(ck.export_model(best, tmp_path / "small.pt"), weights_only=True)["memory"]
    assert all(torch.equal(kept[k], ckpt["memory"][k]) for k in kept)
    older = {k: v for k, v in ckpt.items() if k not in ("memory", "format", "version")}
    ck.save_checkpoint(tmp_path / "older.pt", older)
    assert Captioner.load(tmp_path / "older.pt", device="cpu").memory is None
    r = cli("export", "--model", tmp_path / "older.pt", "--data", shapes_data, "--workdir", workdir,
            "--output", tmp_path / "given.pt", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    given = torch.load(tmp_path / "given.pt", weights_only=True)["memory"]
    assert torch.equal(given["captions"], ckpt["memory"]["captions"]) and torch.equal(given["owner"], ckpt["memory"]["owner"])
    assert torch.allclose(given["features"].float().abs(), ckpt["memory"]["features"].float().abs(), atol=2e-3)
    r = cli("export", "--model", tmp_path / "older.pt", "--data", tmp_path / "nowhere", "--workdir", workdir,
            "--output", tmp_path / "x.pt", "--device", "cpu")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.pt").exists()


def test_document_frequencies_are_ciders_own():
    from captioning.search.consensus import document_frequencies
    from captioning.metrics.cider import CiderD, ngram_counts
    rng = np.random.default_rng(1)
    captions = [[rng.integers(4, 30, rng.integers(1, 9)).tolist() for _ in range(rng.integers(1, 4))]
                for _ in range(40)]
    m = build_memory(rng.normal(size=(40, 8)), captions, dim=4)
    df = document_frequencies(m.captions, m.owner)
    counted = CiderD(captions).df
    grams = {g for caps in captions for c in caps for g in ngram_counts(c)}
    assert all(df[g] == counted[g] for g in grams) and df[(99, 98)] == 0 and df[(4, 4, 4, 4, 4)] == 0
    assert df[(29, 10 ** 6)] == 0 and df[(10 ** 6,)] == 0       # words beyond the memory's never collide
    assert document_frequencies(np.array([2 ** 20, END], np.int64), np.array([0])) is None   # keys would overflow


def test_a_vocabulary_too_large_for_integer_keys_still_reranks(monkeypatch):
    from captioning.search import consensus
    monkeypatch.setattr(consensus, "document_frequencies", lambda captions, owner: None)
    pooled, captions, centres = two_kinds()
    m = build_memory(pooled, captions, dim=8)
    assert [h.tokens for h in m.rerank([[hyp(MAN, -1.0), hyp(DOG, -2.0)]], centres[:1], 10)[0]] == [DOG, MAN]


def test_the_whole_batch_is_scored_as_score_all_scores_each_photo():
    """rerank scores every photo's candidates against its neighbours' captions in one numpy pass over the batch:
    the same scores as CiderD.score_all one photo at a time (to float rounding), candidates of any length and
    repeated words included, and a candidate with a word the memory never saw still scored (the slow way)."""
    rng = np.random.default_rng(2)
    captions = [[rng.integers(4, 30, rng.integers(1, 12)).tolist() for _ in range(rng.integers(1, 6))]
                for _ in range(80)]
    m = build_memory(rng.normal(size=(80, 8)), captions, dim=6)
    pooled = rng.normal(size=(7, 8)).astype(np.float32)
    beams = [[hyp(rng.integers(4, 30, rng.integers(1, 14)).tolist()) for _ in range(rng.integers(1, 8))]
             for _ in range(7)]
    beams[0].append(hyp([5, 5, 5, 5, 5, 5]))
    cider, rows = m.cider(), m.neighbours(pooled, 9)
    batch = m._batch_scores(cider, beams, rows)
    for hyps, near, scores in zip(beams, rows, batch):
        refs = [v for r in near.tolist() for v in cider.reference(r, m.references(r))]
        assert np.allclose(scores, cider.score_all([h.tokens for h in hyps], refs), rtol=1e-12, atol=1e-12)
        assert np.ptp(scores) > 0 or len(hyps) == 1
    assert m._batch_scores(cider, [[hyp([4, 10 ** 5])]], rows[:1]) is None        # beyond the keys: one by one
    assert len(m.rerank([[hyp([4, 10 ** 5]), hyp([4, 5])]], pooled[:1], 9)[0]) == 2


def test_beam_width_is_the_search_candidates_runs():
    from captioning.config import SearchConfig
    from captioning.search.consensus import beam_width
    memory = object()   # any memory: the width depends only on there being one
    assert beam_width(SearchConfig(beam_size=3, rerank_pool=10), memory) == 10
    assert beam_width(SearchConfig(beam_size=12, rerank_pool=10), memory) == 12
    assert beam_width(SearchConfig(beam_size=3, rerank_pool=10, rerank=False), memory) == 3
    assert beam_width(SearchConfig(beam_size=3, rerank_pool=10), None) == 3
