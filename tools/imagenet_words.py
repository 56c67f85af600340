"""Writes captioning/assets/imagenet_words.json: each of ImageNet's 1,000 classes as plain caption words.

    python tools/imagenet_words.py [--wordnet /usr/share/wordnet] [--output captioning/assets/imagenet_words.json]

Reads WordNet 3.0 (Debian's wordnet-base: `apt-get install wordnet-base`) and the classes' WordNet ids (timm's
imagenet_synsets.txt, in torchvision's class order). Each class gets a chain of words, most specific first:
its own everyday name, then the basic-level words (BASIC) among its WordNet hypernyms, nearest first:
"Egyptian cat" -> ["cat", "animal"], "fox squirrel" -> ["squirrel", "rodent", "animal"], "admiral" ->
["butterfly", "insect", "animal"]. The captioner names a photo with the first word and, where the caption
model's vocabulary lacks it, decodes with the first word of the chain it knows (captioning/grounding/head.py).
`kind` is the class's broad kind (animal, person, food, plant, vehicle, thing...), from the same hypernyms.
"""
import argparse
import json
import os
import sys
from collections import deque
from pathlib import Path

# Everyday words a caption would use for a class. A class takes its nearest hypernym that is one of these.
BASIC = """dog puppy cat tiger lion leopard cheetah jaguar bear panda wolf fox hyena zebra horse donkey camel llama
giraffe elephant rhinoceros hippopotamus pig boar sheep ram goat ox bison cow deer antelope gazelle monkey ape
gorilla chimpanzee orangutan baboon lemur squirrel rabbit hare mouse rat hamster beaver porcupine hedgehog
otter skunk badger weasel mink kangaroo koala wallaby whale dolphin seal sea_lion shark ray fish goldfish eel
bird chicken hen rooster duck goose swan owl eagle vulture parrot penguin flamingo pelican stork crane heron
ostrich peacock pigeon hummingbird woodpecker turkey
snake lizard iguana chameleon crocodile alligator turtle tortoise frog toad salamander newt dinosaur
butterfly moth bee ant beetle ladybug fly dragonfly grasshopper cricket cockroach mantis spider scorpion crab
lobster shrimp snail slug jellyfish starfish coral worm insect
flower daisy rose sunflower tulip orchid mushroom fungus tree plant leaf corn
apple orange lemon banana strawberry pineapple pomegranate fig grape pear melon fruit vegetable broccoli
cauliflower cabbage cucumber pepper mushroom pumpkin squash zucchini artichoke
coffee tea wine beer soup pizza bread sandwich hamburger hotdog cake pie ice_cream chocolate candy meat egg
dessert drink food
car truck bus van taxi ambulance tractor train locomotive tram bicycle motorcycle scooter boat ship canoe
kayak sailboat yacht airplane plane aircraft helicopter airship balloon rocket spacecraft tank cart wagon
carriage sled limousine jeep convertible trailer vehicle
building house church castle tower bridge barn tent palace temple mosque monastery lighthouse fountain
library restaurant shop cinema stadium dam fence wall door gate window roof
ball guitar piano violin drum flute saxophone trumpet accordion harp camera phone telephone computer laptop
television monitor keyboard clock watch lamp chair bench table bed sofa couch desk bookcase umbrella hat
cap helmet shoe boot sandal sock shirt dress coat jacket suit mask glasses sunglasses bag backpack purse
bottle cup mug glass bowl plate pot pan kettle teapot knife spoon fork basket box jar vase can barrel
bucket toy doll kite book sign flag statue sculpture painting picture bubble toilet sink bathtub
microscope telescope robot sword gun axe hammer tool
beach coast shore mountain volcano valley cliff lake river sea ocean waterfall island desert field forest
animal person""".split()

KINDS = [("person", "person"), ("animal", "animal"), ("fruit", "food"), ("vegetable", "food"),
         ("food", "food"), ("nutriment", "food"), ("beverage", "food"), ("plant", "plant"),
         ("fungus", "plant"), ("flower", "plant"), ("vehicle", "vehicle"), ("craft", "vehicle"),
         ("structure", "building"), ("geological_formation", "landscape"), ("clothing", "clothing"),
         ("footwear", "clothing"), ("artifact", "thing")]


def read_nouns(wordnet):
    """WordNet's noun synsets: offset -> (lemmas, hypernym offsets)."""
    nouns = {}
    with open(Path(wordnet) / "data.noun", encoding="utf-8") as f:
        for line in f:
            if line.startswith(" "):
                continue                               # the licence header
            parts = line.split(" | ")[0].split()
            n_words = int(parts[3], 16)
            lemmas = [parts[4 + 2 * i].lower() for i in range(n_words)]
            at = 4 + 2 * n_words
            n_ptrs = int(parts[at])
            ptrs = [parts[at + 1 + 4 * i: at + 5 + 4 * i] for i in range(n_ptrs)]
            hyper = [p[1] for p in ptrs if p[0] in ("@", "@i") and p[2] == "n"]
            nouns[parts[0]] = (lemmas, hyper)
    return nouns


def ancestors(nouns, offset):
    """The synset and its hypernyms, nearest first (breadth-first, each once)."""
    seen, order, queue = {offset}, [], deque([offset])
    while queue:
        o = queue.popleft()
        order.append(o)
        for h in nouns[o][1]:
            if h not in seen:
                seen.add(h)
                queue.append(h)
    return order


def own_word(lemmas, up):
    """The class's everyday name: its first lemma, or that lemma's last word when a hypernym is called so
    ("fox_squirrel" -> "squirrel", "soccer_ball" -> "ball")."""
    name = lemmas[0]
    head = name.split("_")[-1]
    if "_" in name and any(head in l for l in up):
        return head
    return name.replace("_", " ")


def class_words(nouns, offset, basic):
    chain = ancestors(nouns, offset)
    lemma_sets = [nouns[o][0] for o in chain]
    # A hypernym counts by its first (main) lemma: "toy_dog, toy" is no toy, "attire, garb, dress" no dress.
    hits = [w for w in lemma_sets[0] if w in basic][:1] + [ls[0] for ls in lemma_sets[1:] if ls[0] in basic]
    own = own_word(lemma_sets[0], lemma_sets[1:])
    words = []
    for w in ([own] if own.replace(" ", "_") in basic or not hits else []) + hits:
        w = w.replace("_", " ")
        if w not in words:
            words.append(w)
    kind = next((k for lemma, k in KINDS if any(lemma in ls for ls in lemma_sets)), "thing")
    return words, kind


def wnids():
    try:
        import timm.data
    except ImportError:
        sys.exit("timm is needed for ImageNet's class ids (pip install timm; requirements-dev.txt).")
    path = Path(timm.data.__file__).parent / "_info" / "imagenet_synsets.txt"
    return path.read_text().split()


def build(wordnet):
    from torchvision.models import MobileNet_V2_Weights
    names = MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    ids = wnids()
    nouns = read_nouns(wordnet)
    basic = set(BASIC)
    classes = []
    for i, (wnid, name) in enumerate(zip(ids, names)):
        words, kind = class_words(nouns, wnid[1:], basic)
        classes.append({"index": i, "wnid": wnid, "name": name, "words": words, "kind": kind})
    return {"source": "WordNet 3.0 hypernyms (tools/imagenet_words.py)", "classes": classes}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wordnet", default=os.environ.get("WNSEARCHDIR", "/usr/share/wordnet"))
    p.add_argument("--output", default=str(Path(__file__).parent.parent / "captioning/assets/imagenet_words.json"))
    args = p.parse_args()
    if not (Path(args.wordnet) / "data.noun").exists():
        sys.exit(f"WordNet's data.noun not found in {args.wordnet} (apt-get install wordnet-base).")
    text = json.dumps(build(args.wordnet), indent=0, ensure_ascii=False) + "\n"
    tmp = args.output + ".tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
