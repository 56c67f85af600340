"""Everything a model is trained or evaluated on, made ready: the dataset's records with a readable image,
their cached features (extracted when missing), and captions as token ids.

    dataset on disk → records → features (cache) → CaptionData (token ids + the feature row of each)
"""
from dataclasses import dataclass

import torch

from captioning.data.datasets import load_dataset
from captioning.features.extract import extract_features
from captioning.utils import console
from captioning.data.vocab import END, PAD, START, tokenize


@dataclass
class CaptionData:
    """Every caption of a split as token ids, with the feature row of its image."""
    tokens: torch.Tensor    # [N, max_words + 2] int64: <start> words <end> <pad>...
    lengths: torch.Tensor   # [N] tokens including <start> and <end>
    rows: torch.Tensor      # [N] feature rows


def prepare(data_dir, workdir, spec, extract_cfg):
    """Dataset records (with a readable image) and their feature store, extracting when needed."""
    dataset = load_dataset(data_dir)
    if dataset.missing:
        console.print(f"[yellow]{dataset.missing:,} image(s) listed in the dataset are missing and were skipped.[/]")
    if dataset.skipped:
        what = "photo(s) without a .txt caption" if dataset.layout == "sidecars" else "broken annotation row(s)"
        console.print(f"[yellow]{dataset.skipped:,} {what} skipped.[/]")
    paths = sorted({str(r.image) for r in dataset.records})
    store = extract_features(paths, spec, workdir, extract_cfg)
    records = [r for r in dataset.records if str(r.image) not in store.bad]
    return dataset, records, store


def encode_split(records, vocab, row_of, max_words):
    seqs, rows = [], []
    for r in records:
        for c in r.captions:
            ids = vocab.encode(tokenize(c))[:max_words]
            if ids:
                seqs.append([START] + ids + [END])
                rows.append(row_of[str(r.image)])
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
    return CaptionData(tokens, torch.tensor([len(s) for s in seqs]), torch.tensor(rows))
