"""Tokenisation and the word vocabulary.

The vocabulary is a plain list of words whose position is the id. That list goes into the checkpoint
as-is (JSON-safe, loads with torch.load(weights_only=True)), so no pickle is ever needed.
No torch here: the CLI imports this module before it knows whether it needs torch.
"""
import unicodedata
from collections import Counter

SPECIALS = ["<pad>", "<start>", "<end>", "<unk>"]
PAD, START, END, UNK = 0, 1, 2, 3

# Characters kept inside words: letters (L*), combining marks (M*, e.g. accents after NFKC) and numbers (N*),
# plus hyphens and apostrophes between letters. Everything else separates words. The result follows the PTB
# tokenizer that caption metrics use: "t-shirt" stays one word, and "dog's" and Flickr8k's pre-tokenised
# "dog 's" both become "dog" "'s" — so a generated caption scores against references word for word.
_KEEP = ("L", "M", "N")
_INNER = "-'"
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")


def _split_clitic(token):
    for clitic in _CLITICS:
        if token.endswith(clitic) and len(token) > len(clitic):
            return [token[:-len(clitic)], clitic]
    return [token]


def tokenize(text):
    """Lower-cased words of `text`: NFKC-normalised, punctuation and symbols removed, split on whitespace."""
    # NFKC first so that look-alikes (full-width letters, ligatures like "ﬁ", "①") become plain characters
    # and two spellings of the same caption give the same tokens.
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    chars = [c if unicodedata.category(c)[0] in _KEEP or c in _INNER else " " for c in text]
    tokens = []
    for raw in "".join(chars).split():
        token = raw if raw in _CLITICS else raw.strip(_INNER)
        if token and any(unicodedata.category(c)[0] in _KEEP for c in token):
            tokens += _split_clitic(token)
    return tokens


class Vocabulary:
    """Word ↔ id mapping. `words[i]` is the word of id i; the first four are SPECIALS."""

    def __init__(self, words):
        words = list(words)
        if words[:len(SPECIALS)] != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {words[:len(SPECIALS)]}")
        if len(set(words)) != len(words):
            raise ValueError("a vocabulary must not repeat a word")
        if not all(isinstance(w, str) and w for w in words):
            raise ValueError("vocabulary words must be non-empty strings")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, captions, min_count=5):
        """Words seen at least `min_count` times in `captions` (raw text), most frequent first.

        Ties are broken by the word itself so that the same captions always give the same ids,
        whatever order they arrive in (a checkpoint's ids must be reproducible)."""
        counts = Counter()
        for caption in captions:
            counts.update(tokenize(caption))
        kept = [w for w, n in counts.items() if n >= min_count and w not in SPECIALS]
        kept.sort(key=lambda w: (-counts[w], w))
        return cls(SPECIALS + kept)

    def encode(self, text_or_tokens):
        """Ids of a caption (raw text, or a list of tokens); no <start>/<end>; unknown words → UNK."""
        tokens = tokenize(text_or_tokens) if isinstance(text_or_tokens, str) else text_or_tokens
        return [self.index.get(t, UNK) for t in tokens]

    def decode(self, ids):
        """Text of a sequence of ids (a list, numpy array or 1-D tensor): stops at <end>, skips <pad>/<start>."""
        out = []
        for i in ids:
            i = int(i)
            if i == END:
                break
            if i in (PAD, START):
                continue
            if not 0 <= i < len(self.words):
                raise ValueError(f"id {i} is outside the vocabulary of {len(self.words)} words")
            out.append(self.words[i])
        return " ".join(out)

    def coverage(self, captions):
        """Fraction of the words in `captions` that the vocabulary knows (the rest become <unk>).
        Worth reporting after `build`: a low value means min_count is too high for the data."""
        total = known = 0
        for caption in captions:
            ids = self.encode(caption)
            total += len(ids)
            known += sum(i != UNK for i in ids)
        return known / total if total else 1.0

    def __len__(self):
        return len(self.words)

    def __eq__(self, other):
        return isinstance(other, Vocabulary) and self.words == other.words

    def __repr__(self):
        return f"Vocabulary({len(self.words)} words: {' '.join(self.words[4:12])} ...)"
