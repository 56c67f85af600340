"""Grounded search for the torch runtime: the encoder's ImageNet head and the word detectors decide what a
caption may and must say (grounding/guidance.py), and each photo's result carries its tags and a confidence.

Captioner.search calls guided_search when SearchConfig.guidance is on and the model's encoder has its
ImageNet head (pretrained torchvision weights); otherwise the search is exactly the unguided one.
"""
import math
from dataclasses import replace

import numpy as np
import torch

from captioning.grounding.concepts import PEOPLE, Concepts
from captioning.grounding.head import Head, head_arrays, load_classes
from captioning.grounding.guidance import (MODEL_CONFIDENT, OBJECT_CONFIDENT, Grounding, Guided, bias_rows, choose, fallback_text, finish_text,
                       plural_fix, proxy_for, word_confidence)
from captioning.search.numpy_search import Hypothesis
from captioning.search.torch_search import diverse_samples, fill_nbest, search

# Kinds of ImageNet class that are no photo's main object in themselves: a jersey is worn by someone.
NOT_OBJECTS = ("person", "clothing")
# On a photo outside the training photos' world (with a confident object in view, or without), people words
# need a higher people score than the val-calibrated threshold: there Flickr8k-trained probes guess people
# from habit. Higher values catch more people-free outside photos but bar the people of Flickr8k's own
# outside photos too, which costs CIDEr-D on Flickr8k (README, Photos outside Flickr8k).
OBJECT_PEOPLE = 0.6
OUTSIDE_PEOPLE = 0.6
# On photos like the training photos, barring the people of a photo that has some costs more than allowing
# people words in one that has none: a threshold below the detector's val-accuracy threshold (Flickr8k val).
INSIDE_PEOPLE = 0.3
# A photo is "outside" the training photos' world when its 10 nearest training photos (the consensus
# memory) are on average less similar than this; about one in seven of Flickr8k's own val photos are. Only there
# does the search name the object and fall back: on photos like the training photos the caption model
# knows better than the classifier what people say (Flickr8k val).
OUTSIDE_SIM = 0.38
NEAREST = 10


class GroundedHyps(list):
    """One photo's hypotheses, best first, with the Grounding that chose them."""
    grounding = None


class Grounder:
    def __init__(self, head, concepts, vocab):
        self.head, self.concepts, self.vocab = head, concepts, vocab
        self.index = {w: i for i, w in enumerate(vocab.words)}
        self.people_ids = sorted(self.index[w] for w in concepts.people_words if w in self.index)
        self.kind = {}
        for c in head.classes:
            self.kind.setdefault(c["words"][0], c["kind"])

    @classmethod
    def for_model(cls, spec, vocab, channels):
        """The grounder of a model whose encoder has pretrained ImageNet weights with their head; None when
        it has none (random-init encoders, heads of another size) or the detectors are missing."""
        concepts = Concepts.load()
        if concepts is None or spec.weights is None or concepts.mean.shape[0] != channels:
            return None
        try:
            if spec.weights_path:
                state = torch.load(spec.weights_path, map_location="cpu", weights_only=True)
            else:
                from captioning.features.encoders import resolve_weights
                state = resolve_weights(spec.name, spec.weights).get_state_dict(progress=False)
        except Exception:   # offline without the file, or a damaged one: captions still come, unguided
            return None
        arrays = head_arrays(state, channels)
        return cls(Head(*arrays, load_classes()), concepts, vocab) if arrays else None

    def ground(self, features, tag_threshold, memory=None):
        """features as search takes them (grid or pooled, mirrored readings side by side) -> a Grounding each.
        `memory`: the model's consensus memory, which tells photos like the training photos from others."""
        f = np.asarray(features, dtype=np.float32)
        pooled = f.mean(1) if f.ndim == 3 else f
        c = self.concepts.mean.shape[0]
        readings = [pooled[:, i:i + c] for i in range(0, pooled.shape[1], c)]
        probs = self.head.probs(pooled)
        scores = np.mean([self.concepts.scores(r, probs) for r in readings], 0)
        objects = self.head.main_object(probs, tag_threshold)
        outside = similarity(memory, readings[0]) < OUTSIDE_SIM if memory is not None else np.ones(len(f), bool)
        people = scores[:, self.concepts.words.index(PEOPLE)]
        tags = self.head.tags(probs, tag_threshold)
        concept_tags = self.concepts.tags(scores)
        out = []
        for i, (word, score, kind) in enumerate(objects):
            g = Grounding(tags=self._tags(tags[i], concept_tags[i]), person=round(float(people[i]), 4))
            g.extra["outside"] = bool(outside[i])
            if outside[i] and word is not None and kind not in NOT_OBJECTS:
                g.word, g.kind, g.extra["score"] = word, kind, round(score, 4)
                g.proxy = proxy_for(self.head, word, self.index)[0]
            g.bar_people = people[i] < (OBJECT_PEOPLE if g.word else OUTSIDE_PEOPLE if outside[i] else INSIDE_PEOPLE)
            if g.bar_people:   # the keywords say what the caption says
                g.tags = [t for t in g.tags if t["word"] != PEOPLE]
            out.append(g)
        return out

    @staticmethod
    def _tags(objects, concepts):
        seen, out = set(), []
        for t in sorted(objects + concepts, key=lambda t: -t["score"]):
            if t["word"] not in seen:
                seen.add(t["word"])
                out.append(t)
        return out


def similarity(memory, pooled):
    """[B] mean cosine similarity of each photo to its NEAREST most similar training photos (in the memory's
    PCA space, as the re-ranking's neighbours are found)."""
    from captioning.search.consensus import _unit
    query = _unit((_unit(pooled.astype(np.float32)) - memory.mean) @ memory.basis.astype(np.float32))
    sims = query @ np.asarray(memory.features, np.float32).T
    k = min(NEAREST, sims.shape[1])
    return np.sort(np.partition(sims, -k, axis=1)[:, -k:], axis=1).mean(1)


def guided_search(grounder, decoder, features, cfg, keep_alphas=False, memory=None):
    """search.search's captions, guided per photo (see guidance.py); each photo's list is GroundedHyps."""
    gs = grounder.ground(features.float().cpu().numpy(), cfg.tag_threshold, memory)
    bars, boosts = bias_rows(gs, len(grounder.vocab.words), grounder.people_ids)
    dev = features.device
    guided = Guided(decoder, torch.from_numpy(bars).to(dev), torch.from_numpy(boosts).to(dev),
                    torch.tensor([-1 if g.proxy is None else g.proxy for g in gs], device=dev))
    # All the candidates the search ranks (the re-ranking pool), so that one naming the object can be chosen.
    pool = cfg.rerank_pool if (memory is not None and cfg.rerank) else cfg.beam_size
    beams = search(guided, features, replace(cfg, num_captions=max(cfg.num_captions, pool), diversity="beam"),
                   keep_alphas, memory)
    firsts = [[_first(hyps, g, grounder)] for hyps, g in zip(beams, gs)]
    if cfg.num_captions == 1:
        chosen = firsts
    elif cfg.diversity == "sample":
        chosen = fill_nbest(firsts, diverse_samples(guided, features, cfg, firsts), cfg.num_captions)
    else:
        chosen = [(f + [h for h in hyps if h is not f[0]])[:cfg.num_captions] for f, hyps in zip(firsts, beams)]
    out = []
    for hyps, g in zip(chosen, gs):
        hs = GroundedHyps(hyps)
        hs.grounding = g
        out.append(hs)
    return out


def _first(hyps, g, grounder):
    """The caption shown first: the best candidate that names the object and bars what must be barred,
    or a plain caption saying only what is known."""
    best = choose(hyps, g, grounder.people_ids)
    if best is None and not g.extra["outside"]:
        best = next((h for h in hyps if not set(grounder.people_ids).intersection(h.tokens)), hyps[0])
    sure = best is not None and (not g.extra["outside"] or
                                 word_confidence(best) >= (OBJECT_CONFIDENT if g.word else MODEL_CONFIDENT))
    if sure:
        best.confidence = round(max(word_confidence(best), g.extra.get("score", 0.0)), 4)
        best.text = plural_fix(finish_text(grounder.vocab.decode(best.tokens), g, grounder.vocab.words))
        return best
    text = fallback_text(g)
    ids = [grounder.index[w] for w in text.split() if w in grounder.index]
    confidence = g.extra.get("score", 0.0)
    h = Hypothesis(ids, math.log(max(confidence, 1e-4)), math.log(max(confidence, 1e-4)))
    h.text, h.confidence = text, confidence
    return h
