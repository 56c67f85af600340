"""Training objectives: how a batch becomes a loss. train.py runs the epochs, resumes, scores the dev split
and writes the checkpoints the same way for every objective registered here.

    xe    cross-entropy with teacher forcing (label smoothing) plus the decoder's own term
    scst  self-critical sequence training (Rennie et al. 2017): sampled captions rewarded by CIDEr-D

An objective is a whole plug-in: train.py asks it, never its name, everything that differs. Before
anything is built, its class answers
    learning_rate(cfg)          the rate AdamW starts at (--lr, or --scst-lr for self-critical training)
    start_from(workdir, cfg)    the checkpoint training starts from (weights, vocabulary, model sizes,
                                encoder), or None to start from scratch
    scores_start                True: the starting model's dev score is "epoch 0", saved as the first
                                best.pt and last.pt, so best.pt is never worse than the start
and, built from the training config, the decoder and the training captions, it offers:
    module              what runs the steps (wrapped for DDP): a forward() that makes the loss's inputs
    batches(gen, world) the epoch's global batches, as index tensors
    loss(model, store, idx, device) -> (loss to backpropagate, statistic sum, statistic count)
    stat                the history key of the epoch's mean statistic ("train_loss", "train_reward")
    dev_beam            the beam size that dev scoring searches with after each epoch
Adding one is one class with `@register("name")`.
"""
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from captioning import distributed
from captioning.models.contract import caption_loss
from captioning.metrics.cider import CiderD
from captioning.config import SearchConfig
from captioning.search.torch_search import beam_search, sample
from captioning.features.store import load_unique
from captioning.training.checkpoint import find_model, models_dir
from captioning.utils import console, registry, temp_path_for
from captioning.data.vocab import END, PAD

OBJECTIVES = {}


register = registry(OBJECTIVES)


def objective_class(name):
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{name}' (expected one of: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]


def build_objective(cfg, decoder, data):
    return objective_class(cfg.objective)(cfg, decoder, data)


# --- batching -------------------------------------------------------------------------------------------

def length_buckets(lengths, batch_size, generator):
    """Batches of captions of (nearly) equal length, in random order: the fused nn.LSTM then runs few,
    full time steps. Shuffle, stable-sort by length, cut into batches, shuffle the batches."""
    perm = torch.randperm(len(lengths), generator=generator)
    order = perm[torch.sort(lengths[perm], stable=True).indices]
    batches = list(torch.split(order, batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def image_batches(rows, batch_size, generator):
    """Batches of about `batch_size` captions made of whole images: all captions of a few random images.

    The image-side work (feature projection, attention keys) then runs once per image instead of once per
    caption — 5x less of the costliest part on Flickr8k and COCO. Padding costs nothing either way: the
    decoders skip padded positions (packed sequences, shrinking batches)."""
    uniq, inverse = torch.unique(rows, return_inverse=True)
    per_batch = max(1, round(batch_size * len(uniq) / len(rows)))
    by_image = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=len(uniq))
    groups = torch.split(by_image, counts.tolist())
    order = torch.randperm(len(uniq), generator=generator).tolist()
    return [torch.cat([groups[i] for i in order[j:j + per_batch]]) for j in range(0, len(order), per_batch)]


def make_batches(decoder, data, batch_size, generator):
    """Per decoder, the batching measured fastest on a CPU (bench/train_speed.py): the grid decoders' cost
    is mostly per image, Show-and-Tell's mostly per time step."""
    if decoder.uses_grid:
        return image_batches(data.rows, batch_size, generator)
    return length_buckets(data.lengths, batch_size, generator)


def for_ranks(batches):
    """Under torchrun each rank needs a part of every step, or the others would wait for its gradients."""
    world = distributed.world_size()
    return [b for b in batches if len(b) >= world] if world > 1 else batches


# --- cross-entropy --------------------------------------------------------------------------------------

def decoder_loss(model, feats, batch_tokens, batch_lengths, cfg, image_index=None, weights=(1.0, 1.0)):
    """Mean cross-entropy per token (+ the decoder's own term, e.g. the attention penalty, a mean per
    caption), times `weights`: (token, caption) weights that make a rank's loss its share of the whole
    global batch's."""
    logits, targets, aux = model(feats, batch_tokens, batch_lengths, image_index)
    loss = caption_loss(logits, targets, cfg.label_smoothing) * weights[0]
    extra = unwrap(model).extra_loss(aux) if cfg.att_reg else None
    if extra is not None:
        loss = loss + cfg.att_reg * extra * weights[1]
    return loss, len(targets)


def unwrap(model):
    """The module inside a DistributedDataParallel or torch.compile wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


@register("xe")
class CrossEntropy:
    """Teacher forcing on the reference captions; dev scoring is greedy (fast, and what XE selects by)."""
    stat = "train_loss"
    dev_beam = 1
    scores_start = False     # a new model has no score to keep

    @staticmethod
    def learning_rate(cfg):
        return cfg.lr

    @staticmethod
    def start_from(workdir, cfg):
        return None          # from scratch

    def __init__(self, cfg, decoder, data):
        self.cfg, self.decoder, self.data, self.module = cfg, decoder, data, decoder

    def batches(self, generator, world):
        return for_ranks(make_batches(self.decoder, self.data, self.cfg.batch_size * world, generator))

    def loss(self, model, store, idx, device):
        data, world = self.data, distributed.world_size()
        part = distributed.batch_part(idx)
        # DDP averages the ranks' gradients; weighting each rank's mean loss by its share of the batch's
        # tokens (captions, for the attention penalty) × world size gives the whole batch's gradient.
        tokens, mine = int((data.lengths[idx] - 1).sum()), int((data.lengths[part] - 1).sum())
        weights = (world * mine / tokens, world * len(part) / len(idx))
        feats, index = load_unique(store, data.rows[part], self.decoder.uses_grid, device)
        width = int(data.lengths[part].max())
        loss, _ = decoder_loss(model, feats, data.tokens[part, :width].to(device), data.lengths[part].to(device),
                               self.cfg, index, weights)
        return loss, float(loss.detach()) * tokens / world, tokens / world


# --- self-critical sequence training --------------------------------------------------------------------

class Sampler(nn.Module):
    """The decoder as a module whose forward() samples: DistributedDataParallel synchronises the gradients
    of whatever runs inside forward(), so sampling must happen there."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, feats, n, max_len):
        return sample(self.decoder, feats, n, max_len)


def references_by_image(data):
    """{feature row: [reference token ids + <end>, ...]} from the training captions."""
    refs = {}
    for tokens, length, row in zip(data.tokens.tolist(), data.lengths.tolist(), data.rows.tolist()):
        refs.setdefault(row, []).append(tokens[1:length])     # drop <start>, keep <end>
    return refs


def caption_ids(tokens):
    """Sampled token rows → id lists up to and including <end> (a caption cut off at max_len has none)."""
    return [[w for w in row if w != PAD] for row in tokens.tolist()]


def self_critical_advantage(rewards, k):
    """rewards [B*K], image-major → reward minus the mean reward of the image's other K−1 samples."""
    r = rewards.view(-1, k)
    baseline = (r.sum(1, keepdim=True) - r) / (k - 1)
    return (r - baseline).view(-1)


@register("scst")
class SelfCritical:
    """Rennie et al. 2017 with the sample-mean baseline: for each image K captions are sampled (dropout on,
    as in training), each rewarded by its CIDEr-D against the image's references (document frequencies
    from all training references, `<end>` counted as a word so that fragments lose), and pushed up or down
    by how much it beats the mean of the image's other samples. Dev scoring uses beam search, the search a
    user gets."""
    stat = "train_reward"
    dev_beam = SearchConfig.beam_size
    scores_start = True      # the model it starts from is the score to beat

    @staticmethod
    def learning_rate(cfg):
        return cfg.scst_lr

    @staticmethod
    def start_from(workdir, cfg):
        """--init-from, default the workdir's best.pt, which is first kept as xe_best.pt: the new run's
        best.pt replaces it, and the cross-entropy model must not be lost."""
        path = Path(find_model(workdir, cfg.init_from or None))
        best = models_dir(workdir) / "best.pt"
        if not (path.exists() and best.exists() and path.resolve() == best.resolve()):
            return path
        kept = models_dir(workdir) / "xe_best.pt"
        if distributed.is_main():
            for src, dst in ((best, kept), (best.with_suffix(".json"), kept.with_suffix(".json"))):
                if src.exists():
                    tmp = temp_path_for(dst)
                    shutil.copyfile(src, tmp)
                    os.replace(tmp, dst)
        distributed.barrier()
        console.print(f"Starting from {best}, kept as {kept}.")
        return kept

    def __init__(self, cfg, decoder, data):
        self.cfg, self.decoder = cfg, decoder
        self.k = max(2, cfg.scst_samples)
        self.refs = references_by_image(data)
        self.rows = torch.tensor(sorted(self.refs))
        self.cider = CiderD(list(self.refs.values()))
        self.module = Sampler(decoder)

    def batches(self, generator, world):
        images = max(1, self.cfg.batch_size // self.k) * world     # --batch-size counts sampled captions
        order = self.rows[torch.randperm(len(self.rows), generator=generator)]
        return for_ranks(list(torch.split(order, images)))

    def loss(self, model, store, idx, device):
        world = distributed.world_size()
        part = distributed.batch_part(idx)
        feats, index = load_unique(store, part, self.decoder.uses_grid, device)
        self.decoder.train(self.cfg.scst_dropout)
        tokens, logps, _ = model(feats[index], self.k, SearchConfig.max_len)   # as long as search's
        keys = part.repeat_interleave(self.k).tolist()
        rewards = torch.tensor(self.cider.scores(caption_ids(tokens), keys, self.refs), device=device)
        if self.cfg.scst_baseline == "greedy":   # Rennie et al.'s own: beat the caption the model would give
            advantage = rewards - self.greedy_rewards(feats[index], part).repeat_interleave(self.k)
        else:
            advantage = self_critical_advantage(rewards, self.k)
        # REINFORCE: each sample's summed log-probability, weighted by its advantage; a mean per sample,
        # × the rank's share of the global batch's images (see CrossEntropy.loss).
        loss = -(advantage * logps.sum(1)).mean() * (world * len(part) / len(idx))
        return loss, float(rewards.sum()), float(len(rewards))

    @torch.no_grad()
    def greedy_rewards(self, feats, rows):
        training = self.decoder.training
        self.decoder.eval()
        greedy = [h[0].tokens + [END] for h in beam_search(self.decoder, feats, SearchConfig(beam_size=1))]
        self.decoder.train(training)
        return torch.tensor(self.cider.scores(greedy, rows.tolist(), self.refs), device=feats.device)

