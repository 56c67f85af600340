"""Tokenisation and vocabulary: properties over arbitrary text, plus the exact behaviour training relies on."""
import json
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from captioning.data.vocab import END, PAD, SPECIALS, START, UNK, Vocabulary, tokenize

words = st.text(alphabet=st.characters(categories=("Ll", "Nd")), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_tokenize_never_crashes_and_gives_clean_tokens(text):
    tokens = tokenize(text)
    for t in tokens:
        assert t and t == t.strip() and not any(c.isspace() for c in t)
        assert t == t.lower()
        # no punctuation, symbols or controls, except PTB-style inner hyphens/apostrophes ("t-shirt", "'s")
        assert not any(unicodedata.category(c)[0] in "PSZC" and c not in "-'" for c in t)
        assert any(unicodedata.category(c)[0] in "LMN" for c in t)
        assert t in ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m") or (t[0] not in "-'" and t[-1] not in "-'")
    assert tokenize(" ".join(tokens)) == tokens  # tokens are a fixed point


@settings(max_examples=200, deadline=None)
@given(st.lists(words, min_size=1, max_size=12))
def test_encode_decode_round_trip_for_known_words(ws):
    ws = [t for w in ws for t in tokenize(w)]
    vocab = Vocabulary.build([" ".join(ws)], min_count=1)
    ids = vocab.encode(" ".join(ws))
    assert UNK not in ids
    assert vocab.decode(ids) == " ".join(ws)
    assert vocab.decode([START] + ids + [END, PAD, PAD]) == " ".join(ws)


def test_tokenize_examples():
    assert tokenize("A dog's ball, on the BEACH.  ") == ["a", "dog", "'s", "ball", "on", "the", "beach"]
    assert tokenize("a dog 's ball") == tokenize("a dog's ball")  # Flickr8k's pre-tokenised clitics
    assert tokenize("don't -- stop ' now") == ["do", "n't", "stop", "now"]
    assert tokenize("A red circle at the left.") == ["a", "red", "circle", "at", "the", "left"]
    assert tokenize("there is a red circle on the left .") == tokenize("There is a red circle on the left")
    assert tokenize("ＡＢＣ ﬁsh") == ["abc", "fish"]  # NFKC: full-width letters, ligature
    assert tokenize("Café 2 t-shirts") == ["café", "2", "t-shirts"]
    assert tokenize("") == [] and tokenize(" .,!? ") == []


def test_specials_come_first():
    vocab = Vocabulary.build(["a cat", "a dog"], min_count=1)
    assert vocab.words[:4] == SPECIALS
    assert (PAD, START, END, UNK) == (0, 1, 2, 3)
    assert [vocab.words[i] for i in (PAD, START, END, UNK)] == SPECIALS


def test_min_count():
    captions = ["a cat sat", "a cat ran", "a dog"]
    assert Vocabulary.build(captions, min_count=2).words[4:] == ["a", "cat"]
    assert Vocabulary.build(captions, min_count=3).words[4:] == ["a"]
    assert len(Vocabulary.build(captions, min_count=1)) == 4 + 5
    assert len(Vocabulary.build(captions, min_count=10)) == 4


def test_order_is_by_count_then_word_whatever_the_input_order():
    captions = ["zebra apple", "apple mango", "zebra", "mango", "kiwi"]
    vocab = Vocabulary.build(captions, min_count=1)
    assert vocab.words[4:] == ["apple", "mango", "zebra", "kiwi"]
    assert Vocabulary.build(list(reversed(captions)), min_count=1).words == vocab.words
    assert Vocabulary.build(iter(captions), min_count=1).words == vocab.words  # any iterable, read once


def test_encode_and_decode():
    vocab = Vocabulary.build(["a red circle on the left"], min_count=1)
    ids = vocab.encode("A red SQUARE on the left.")
    assert ids[2] == UNK and START not in ids and END not in ids
    assert vocab.encode(["a", "red"]) == vocab.encode("a red")
    assert vocab.decode(ids) == "a red <unk> on the left"
    assert vocab.decode([START, vocab.index["red"], END, vocab.index["circle"]]) == "red"
    with pytest.raises(ValueError):
        vocab.decode([len(vocab)])


def test_decode_accepts_numpy():
    np = pytest.importorskip("numpy")
    vocab = Vocabulary.build(["a cat"], min_count=1)
    assert vocab.decode(np.array([START, 4, 5, END], dtype=np.int64)) == vocab.decode([1, 4, 5, 2])


def test_json_round_trip():
    vocab = Vocabulary.build(["Une étoile ✨ brille", "a cat", "a dog"], min_count=1)
    again = Vocabulary(json.loads(json.dumps(vocab.words)))
    assert again == vocab and again.words == vocab.words and again.index == vocab.index
    assert again.encode("une étoile") == vocab.encode("une étoile")


def test_bad_word_lists_are_refused():
    with pytest.raises(ValueError):
        Vocabulary(["a", "b"])
    with pytest.raises(ValueError):
        Vocabulary(SPECIALS + ["a", "a"])


def test_coverage():
    vocab = Vocabulary.build(["a cat", "a dog"], min_count=2)
    assert vocab.coverage(["a cat", "a dog"]) == 0.5
    assert vocab.coverage([]) == 1.0
