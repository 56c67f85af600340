"""Grounding: what the photo holds, from evidence other than the caption decoder (torch-free, numpy only).

    tags      the encoder's own ImageNet head: class probabilities -> caption words (assets/imagenet_words.json)
"""
