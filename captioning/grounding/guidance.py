"""Guided search: captions that say what the encoder's classifier and the word detectors see, and no more.

Per photo, grounding decides two things (ground): the main object's word, when the ImageNet head names it
confidently (a tag at or above the threshold), and whether people words are allowed (the people detector,
concepts.py). Search then runs with a decoder wrapper (Guided) whose every step adds a per-photo bias to the
word log-probabilities: people words barred (-inf) where nobody is seen; the object's word raised until the
caption has said it. The bias rides in the decoder state, so beam search's bookkeeping (reordering, images
leaving the batch, N-best, re-ranking, the mirror reading, ensembles) carries it unchanged. After re-ranking
the first candidate that names the object wins (choose); if none does, or neither the model nor the tags are
confident, the caption is a plain one saying only what is known (fallback_text: "a close-up of an orange").

Words the caption model's vocabulary lacks (butterfly, ladybug, baboon, lemon...): the search decodes with
the nearest word of the tag's WordNet chain that the vocabulary has (ladybug -> beetle/insect/animal) and
the tag's own word replaces it in the text (as DCC does, Hendricks et al. 2016): "an insect on a green leaf"
becomes "a ladybug on a green leaf".

Torch-free: Guided computes with whatever arrays the runtime's decoder gives (torch tensors or numpy arrays),
so the ONNX runtime can guide with the same code.
"""
import math
import re
from dataclasses import dataclass, field

NEG = float("-inf")
# Raising the object's word by this much (nats) makes it likely without forcing it anywhere: the decoder
# still decides where it fits; choose() then checks that it was said.
BOOST = 4.0
# A caption whose words average below this probability (under the guided search) is one the model is unsure
# of: with no object known it gives way to fallback_text ("a photo"); with an object known, below
# OBJECT_CONFIDENT, the model is fighting the guidance (a story around an orange), and the plain caption
# naming the object is the truer one. Both chosen on the outside-photos dev set and Flickr8k val.
MODEL_CONFIDENT = 0.2
OBJECT_CONFIDENT = 0.22
FRAMES = {"animal": "a close-up of {}", "food": "a close-up of {}", "plant": "a close-up of {}",
          "thing": "a close-up of {}", "clothing": "a close-up of {}", "vehicle": "a photo of {}",
          "building": "a view of {}", "landscape": "a view of {}", "person": "a photo of {}"}


@dataclass
class Grounding:
    """What is known about one photo before its caption is chosen."""
    tags: list                  # [{"word", "score"}], best first, at or above the tag threshold
    person: float               # probability that someone is in the photo
    word: str | None = None     # the main object's word (the best tag), None when no tag is confident
    kind: str = "thing"         # its broad kind (imagenet_words.json), for the fallback's wording
    proxy: int | None = None    # the vocabulary word the search uses for it (itself when the vocabulary has it)
    bar_people: bool = False    # people words are barred
    best_guess: str | None = None   # the head's best word even when not confident
    extra: dict = field(default_factory=dict)


def article(word):
    return "an" if word[:1].lower() in "aeiou" else "a"


def with_article(word):
    return f"{article(word)} {word}"


def proxy_for(head, word, vocab_index):
    """(the vocabulary id standing in for `word`, the word it is): the first word of its WordNet chain that
    the vocabulary has, e.g. ladybug -> insect; (None, None) when none is."""
    for w in head.chain(word):
        if w in vocab_index:
            return vocab_index[w], w
    return None, None


def bias_rows(groundings, vocab_size, people_ids):
    """(bar [B, V]: 0, or -inf for barred words; boost [B, V]: BOOST at each photo's object word), float32."""
    import numpy as np
    bar = np.zeros((len(groundings), vocab_size), np.float32)
    boost = np.zeros_like(bar)
    for i, g in enumerate(groundings):
        if g.bar_people:
            bar[i, list(people_ids)] = NEG
        if g.proxy is not None:
            boost[i, g.proxy] = BOOST
            bar[i, g.proxy] = 0.0
    return bar, boost


class Guided:
    """A decoder (or MirrorPair/Ensemble) whose step adds each photo's bias to the word log-probabilities.
    `bar`, `boost`: [B, V] arrays of the runtime's kind (torch tensors or numpy arrays), as init_state's
    features are batched. The boost holds until the word has been said (state "g.need", per beam)."""

    def __init__(self, decoder, bar, boost, word_ids):
        self.decoder, self.bar, self.boost, self.word_ids = decoder, bar, boost, word_ids
        self.uses_grid = decoder.uses_grid
        self.per_image = tuple(getattr(decoder, "per_image", ())) + ("g.bar", "g.boost", "g.word")

    def init_state(self, features):
        state = dict(self.decoder.init_state(features))
        need = self.word_ids >= 0
        return {**state, "g.bar": self.bar, "g.boost": self.boost, "g.word": self.word_ids,
                "g.need": need * 1.0}

    def step(self, tokens, state):
        inner = {k: v for k, v in state.items() if not k.startswith("g.")}
        logits, new, alpha = self.decoder.step(tokens, inner)
        need = state["g.need"] * (tokens != state["g.word"])
        logp = logits - _logsumexp(logits)
        biased = logp + state["g.bar"] + state["g.boost"] * need[:, None]
        return biased, {**new, "g.bar": state["g.bar"], "g.boost": state["g.boost"],
                        "g.word": state["g.word"], "g.need": need}, alpha


def _logsumexp(x):
    """Row-wise log-sum-exp [N, 1] of a torch tensor or numpy array (the members' logits may be unnormalised)."""
    if hasattr(x, "logsumexp"):
        return x.float().logsumexp(-1, keepdim=True)
    import numpy as np
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def word_confidence(hyp):
    """The caption's mean word probability (geometric, <end> included) under the search that chose it."""
    return math.exp(hyp.logprob / (len(hyp.tokens) + 1))


def choose(hyps, g, people_ids):
    """Candidates (re-ranked, best first) -> (the best that names the object and has no barred word, or
    None when none does)."""
    banned = set(people_ids) if g.bar_people else set()
    for h in hyps:
        if (g.proxy is None or g.proxy in h.tokens) and not banned.intersection(h.tokens):
            return h
    return None


def finish_text(text, g, vocab_words):
    """The tag's own word in place of its in-vocabulary stand-in (a/an fixed) when the vocabulary lacks it."""
    if g.word is None or g.proxy is None or g.word in vocab_words:
        return text
    proxy = vocab_words[g.proxy]
    words = text.split()
    if proxy not in words:
        return text
    i = words.index(proxy)
    words[i] = g.word
    if i > 0 and words[i - 1] in ("a", "an"):
        words[i - 1] = article(g.word)
    return " ".join(words)


def fallback_text(g):
    """A plain caption that says only what is known: the object, framed by its kind; or just 'a photo'."""
    if g.word:
        return FRAMES.get(g.kind, "a photo of {}").format(with_article(g.word))
    return "a photo"


def plural_fix(text):
    """'a apple' -> 'an apple' wherever a swap or a frame left a wrong article."""
    return re.sub(r"\b(a|an) (\w+)", lambda m: f"{article(m.group(2))} {m.group(2)}", text)


def result_extras(captions, hyps):
    """(captions with the guided texts, tags, confidence of the first) for one photo's Result."""
    g = getattr(hyps, "grounding", None)
    texts = [getattr(h, "text", None) or c for h, c in zip(hyps, captions)]
    first = hyps[0] if hyps else None
    confidence = getattr(first, "confidence", None)
    if confidence is None and first is not None and math.isfinite(first.logprob):
        confidence = round(word_confidence(first), 4)
    return texts, (g.tags if g is not None else []), confidence
