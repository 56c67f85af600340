"""Property-based tests (hypothesis) for what people type and what datasets hold: every loader reads arbitrary
caption text back as written (odd Unicode, quotes, commas, newlines, very long captions) modulo stripping,
caption cleaning and tokenisation behave on any text, and the menu's prompts and path cleaning survive any
answer. Fixed-example tests of the same code are in test_datasets.py and test_vocab.py."""
import csv
import io
import json
import os
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from rich.console import Console

from captioning.interfaces import menu
from captioning.data.datasets import load_dataset
from captioning.utils import CaptioningError, clean_user_path
from captioning.data.vocab import END, PAD, START, UNK, Vocabulary, tokenize

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_jpeg = io.BytesIO()
Image.new("RGB", (4, 4), (10, 200, 30)).save(_jpeg, format="JPEG")
JPEG = _jpeg.getvalue()

# Any text a file can hold (no lone surrogates: they cannot be written as UTF-8), sometimes repeated into a
# very long caption; plus the characters that break naive CSV and JSON handling, often.
tricky = st.sampled_from(['"', "'", ",", "\n", "\r\n", "\r", "\t", " ", "\u00a0", "\u2028", "\ufeff", "\\", "é",
                          "e\u0301", "ß", "İ", "Σ", "写真", "🐕", "\u200b", "\x00", "\x1c", "ﬁ", "..."])
piece = st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40), tricky)
caption = st.one_of(
    st.lists(piece, max_size=8).map("".join),
    st.tuples(st.lists(piece, min_size=1, max_size=4).map("".join), st.integers(50, 400)).map(lambda t: t[0] * t[1]),
)
image_captions = st.lists(st.lists(caption, min_size=1, max_size=4), min_size=1, max_size=4)


def kept(captions):
    """What a loader must give back: stripped captions that hold a word, in order."""
    return [c.strip() for c in captions if tokenize(c)]


def check_round_trip(root, names, written):
    """load_dataset(root) gives every image with a word-bearing caption back with exactly kept(captions)."""
    expected = {n: kept(c) for n, c in zip(names, written) if kept(c)}
    if not expected:
        with pytest.raises(CaptioningError, match="No captioned images"):
            load_dataset(root)
        return
    dataset = load_dataset(root)
    got = {r.image.name: r.captions for r in dataset.records}
    assert got == expected
    assert dataset.missing == 0
    for r in dataset.records:
        assert all(tokenize(c) for c in r.captions)   # every caption trains on at least one word


def images(root, names):
    (root / "Images").mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / "Images" / n).write_bytes(JPEG)


@SETTINGS
@given(image_captions)
def test_mini_coco_list_reads_back_any_caption(written):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ids = list(range(1, len(written) + 1))
        names = [f"COCO_train2014_{i:012d}.jpg" for i in ids]
        items = [{"image_id": i, "caption": c} for i, caps in zip(ids, written) for c in caps]
        (root / "captions.json").write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
        images(root, names)
        check_round_trip(root, names, written)


@SETTINGS
@given(image_captions)
def test_coco_dict_reads_back_any_caption(written):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = [f"img {i} é.jpg" for i in range(len(written))]
        data = {"images": [{"id": 100 + i, "file_name": n} for i, n in enumerate(names)],
                "annotations": [{"id": k, "image_id": 100 + i, "caption": c}
                                for k, (i, c) in enumerate((i, c) for i, caps in enumerate(written) for c in caps)]}
        (root / "captions_train2014.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        images(root, names)
        check_round_trip(root, names, written)


@SETTINGS
@given(image_captions)
def test_karpathy_reads_back_any_caption(written):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = [f"{i}.jpg" for i in range(len(written))]
        data = {"images": [{"filename": n, "split": "restval", "sentences": [{"raw": c, "tokens": []} for c in caps]}
                           for n, caps in zip(names, written)]}
        (root / "dataset_flickr8k.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        images(root, names)
        check_round_trip(root, names, written)


@SETTINGS
@given(image_captions, st.sampled_from([("\r\n", csv.QUOTE_MINIMAL), ("\n", csv.QUOTE_ALL)]))
def test_flickr_csv_reads_back_any_caption(written, style):
    """captions.txt as a CSV writer quotes it (quotes, commas and line breaks inside captions). With "\n" line
    ends, QUOTE_MINIMAL would leave a caption's lone "\r" unquoted, which every CSV reader takes for a line
    break (the loader then names the file and line); RFC 4180 quotes it, as QUOTE_ALL does."""
    newline, quoting = style
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = [f"{1000 + i}_a, b.jpg" for i in range(len(written))]   # a comma in the file name, too
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, lineterminator=newline, quoting=quoting)
        writer.writerow(["image", "caption"])
        for n, caps in zip(names, written):
            for c in caps:
                writer.writerow([n, c])
        (root / "captions.txt").write_text(buffer.getvalue(), encoding="utf-8", newline="")
        images(root, names)
        check_round_trip(root, names, written)


plain = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters='"\r\n\x00'), max_size=200)


@SETTINGS
@given(st.lists(st.lists(plain, min_size=1, max_size=4), min_size=1, max_size=4))
def test_flickr_csv_unquoted_captions_with_commas(written):
    """Hand-written lines `name,caption` with commas left unquoted keep the whole caption."""
    assume(all(not c.lstrip().startswith('"') for caps in written for c in caps))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = [f"{i}.jpg" for i in range(len(written))]
        lines = ["image,caption"] + [f"{n},{c}" for n, caps in zip(names, written) for c in caps]
        (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        images(root, names)
        # A line whose caption is empty is `name,` (two fields, one empty): dropped like any empty caption.
        check_round_trip(root, names, written)


# ---- caption cleaning and tokenisation ----------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(caption)
def test_surrounding_space_and_punctuation_change_nothing(text):
    assert tokenize(f" \t{text} .\n") == tokenize(text)
    assert tokenize(f"{text}, {text}") == tokenize(text) * 2


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(max_codepoint=127), max_size=200))
def test_ascii_case_does_not_matter(text):
    assert tokenize(text.upper()) == tokenize(text.lower()) == tokenize(text)


@settings(max_examples=100, deadline=None)
@given(st.lists(caption, max_size=6), caption)
def test_encode_decode_of_any_text(train_captions, text):
    """Any caption encodes to word ids only (never <pad>/<start>/<end>); decoding gives its tokens, with the
    words the vocabulary lacks as <unk>."""
    vocab = Vocabulary.build(train_captions, min_count=1)
    ids = vocab.encode(text)
    assert all(UNK <= i < len(vocab) for i in ids) and not {PAD, START, END} & set(ids)
    tokens = tokenize(text)
    assert len(ids) == len(tokens)
    assert vocab.decode(ids) == " ".join(t if t in vocab.index else "<unk>" for t in tokens)
    assert Vocabulary(json.loads(json.dumps(vocab.words, ensure_ascii=False))) == vocab   # JSON-safe, any text


def test_very_long_captions_are_quick():
    text = "A dog, \"quoted\" — runs through the Grass… " * 5000          # ~220,000 characters
    start = time.perf_counter()
    tokens = tokenize(text)
    assert len(tokens) == 7 * 5000 and tokens[:7] == ["a", "dog", "quoted", "runs", "through", "the", "grass"]
    vocab = Vocabulary.build([text], min_count=1)
    assert len(vocab.encode(text)) == len(tokens)
    assert time.perf_counter() - start < 5


# ---- what people type ----------------------------------------------------------------------------------

path_text = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\\'\"\x00"),
                    min_size=1, max_size=60).filter(lambda s: s == s.strip())


@settings(max_examples=200, deadline=None)
@given(path_text)
def test_quoted_paths_mean_the_same_path(text):
    """Drag and drop wraps a path in quotes, or escapes its spaces; typed, it may start with ~."""
    plain_path = Path(os.path.expanduser(text))
    assert clean_user_path(text) == plain_path
    assert clean_user_path(f'"{text}"') == plain_path == clean_user_path(f"'{text}'")
    assert clean_user_path(f"  {text}  ") == plain_path
    assert clean_user_path(text.replace(" ", "\\ ")) == plain_path


answer = st.one_of(st.text(max_size=30), st.integers(-10**30, 10**30).map(str),
                   st.sampled_from(["", " ", "1e3", "0x10", "٣", "²", "+5", " 7 ", "5.0", "nan", "inf"]))


@settings(max_examples=200, deadline=None)
@given(answer)
def test_number_prompts_take_any_answer(text):
    """Whatever is typed, ask_int returns a number within its bounds (Enter: the default) or asks again."""
    replies = [text, "17"]
    out = Console(file=io.StringIO(), highlight=False)
    out.input = lambda prompt="", **kw: replies.pop(0)
    original, menu.out = menu.out, out
    try:
        value = menu.ask_int("Epochs", 20, 1, 1000)
    finally:
        menu.out = original
    assert isinstance(value, int) and 1 <= value <= 1000
    if replies:   # the first answer was taken
        assert value == (20 if not text.strip() else int(text.strip()))
    else:         # asked again, with a reason
        assert value == 17
        assert "Please type a whole number" in out.file.getvalue() or "out of range" in out.file.getvalue()


@settings(max_examples=200, deadline=None)
@given(answer)
def test_choice_prompts_take_any_answer(text):
    replies = iter([text, "attention"])
    out = Console(file=io.StringIO(), highlight=False)
    out.input = lambda prompt="", **kw: next(replies)
    original, menu.out = menu.out, out
    try:
        value = menu.ask_choice("Decoder", ["lstm", "attention"], "lstm")
    finally:
        menu.out = original
    assert value in ("lstm", "attention")
    if text.strip().lower() in ("lstm", "attention", ""):
        assert value == (text.strip().lower() or "lstm")
    else:
        assert value == "attention" and "Please type one of" in out.file.getvalue()
