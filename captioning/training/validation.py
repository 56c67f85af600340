"""What training measures on the dev split after each epoch: the validation loss (teacher forcing) and
the dev captions' BLEU-4 and CIDEr-D (searched with the objective's dev beam)."""
import torch

from captioning.config import SearchConfig
from captioning.features.store import load_features, load_unique
from captioning.metrics.scores import score_captions
from captioning.models.contract import caption_loss
from captioning.search.torch_search import beam_search
from captioning.training.objectives import image_batches


@torch.inference_mode()
def validation_loss(decoder, store, data, cfg, device):
    decoder.eval()
    total, count = 0.0, 0
    # 160 captions (32 images) a batch: 320 made validation the peak of a training run's memory
    # (bench/memory.py), at no cost in speed.
    for idx in image_batches(data.rows, 160, torch.Generator().manual_seed(0)):
        feats, index = load_unique(store, data.rows[idx], decoder.uses_grid, device)
        width = int(data.lengths[idx].max())
        logits, targets, _ = decoder(feats, data.tokens[idx, :width].to(device), data.lengths[idx].to(device), index)
        total += float(caption_loss(logits, targets)) * len(targets)
        count += len(targets)
    return total / max(count, 1)


@torch.inference_mode()
def caption_rows(decoder, store, rows, vocab, device, beam_size=1, batch=100):
    """Captions for feature rows, as text (greedy by default). Batches of 100 images search as fast as
    larger ones (bench/beam_speed.py) with less memory than 256 did."""
    decoder.eval()
    cfg = SearchConfig(beam_size=beam_size)
    out = []
    for i in range(0, len(rows), batch):
        feats = load_features(store, torch.as_tensor(rows[i:i + batch]), decoder.uses_grid, device)
        out += [vocab.decode(h[0].tokens) for h in beam_search(decoder, feats, cfg)]
    return out


def dev_scores(decoder, store, records, vocab, row_of, device, limit, beam_size=1):
    records = records[:limit]
    captions = caption_rows(decoder, store, [row_of[str(r.image)] for r in records], vocab, device, beam_size)
    cands = {i: c for i, c in enumerate(captions)}
    refs = {i: r.captions for i, r in enumerate(records)}
    s = score_captions(cands, refs, metrics=("BLEU", "CIDEr"), use_java=False)
    return {"BLEU-4": s["BLEU-4"], "CIDEr-D": s["CIDEr-D"]}
