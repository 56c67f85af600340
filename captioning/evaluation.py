"""Running an evaluation: a model captions every image of a dataset split and metrics/scores.py scores it.

    split's records → cached features (extracted when missing) → batched beam search → captions
                    → metrics (metrics/scores.py) → the table on the console and the JSON report

metrics/scores.py only scores text, so training can score its dev captions without this module; this one needs
a whole model (a Captioner), which is why it sits above captioner.py.
"""
from dataclasses import dataclass

import torch

from captioning.inference.captioner import Captioner
from captioning.training.checkpoint import models_dir, report_path
from captioning.metrics.scores import print_metrics_table, score_captions, write_report
from captioning.config import ExtractConfig
from captioning.features.extract import extract_features
from captioning.features.prepare import prepare
from captioning.config import SearchConfig
from captioning.features.store import load_features
from captioning.search.consensus import beam_width
from captioning.utils import CaptioningError, add_task, advance_task, console, make_progress


@dataclass
class EvalRun:
    """Which model is scored on which split, and where the report goes (`evaluate`'s options)."""
    data_dir: str
    split: str = "test"
    model: str | None = None     # a checkpoint, "default" (the built-in model), or None: the workdir's best
    ensemble: tuple = ()         # more checkpoints searched together with `model`
    workdir: str = "."
    device: str = "auto"
    output: str | None = None    # the JSON report; default models/eval_<split>.json in the workdir
    batch_size: int = 100        # images per beam search


def evaluate_model(run: EvalRun, search_cfg: SearchConfig | None = None):
    """Caption every image of `run.split` with batched beam search, score against all references, print
    the table and write the JSON report. Returns the scores."""
    search_cfg = search_cfg or SearchConfig()
    captioner = Captioner.load(run.model, run.workdir, run.device, run.ensemble)
    if not isinstance(captioner, Captioner):
        raise CaptioningError(f"{captioner.source} is an ONNX export, which captions photos only; evaluate the .pt "
                              "model it was exported from.")
    _, records, store = prepare(run.data_dir, run.workdir, captioner.spec, ExtractConfig(device=run.device))
    records = [r for r in records if r.split == run.split]
    if not records:
        raise CaptioningError(f"The dataset has no images in its '{run.split}' split.")
    stores = [store]
    if search_cfg.mirror:   # the default search reads each photo mirrored too: those features, extracted once
        stores.append(extract_features(store.paths, captioner.spec, run.workdir,
                                       ExtractConfig(device=run.device, mirror=True)))
    captions = caption_split(captioner, stores, records, search_cfg, run.batch_size, run.split)
    keys = [str(r.image) for r in records]
    scores = score_captions(dict(zip(keys, captions)), {str(r.image): r.captions for r in records})
    # The search actually run: with re-ranking, beam search is max(--beam-size, --rerank-pool) wide.
    rerank = search_cfg.rerank and captioner.memory is not None
    beam = beam_width(search_cfg, captioner.memory)
    searched = f"beam {beam}" + (f", its {search_cfg.rerank_pool} best re-ranked" if rerank else "")
    print_metrics_table(scores, title=f"{run.split} split, {len(records):,} images, {searched}")
    output = run.output or report_path(models_dir(run.workdir), run.split)
    settings = {"split": run.split, "images": len(records), "model": str(captioner.source),
                "beam_size": beam, "length_alpha": search_cfg.length_alpha,
                "max_len": search_cfg.max_len, "mirror": search_cfg.mirror, "mirror_mode": search_cfg.mirror_mode,
                "stop_early": search_cfg.stop_early,
                "rerank": rerank, "rerank_pool": search_cfg.rerank_pool,
                "neighbours": search_cfg.neighbours}
    write_report(output, scores, [{"image": k, "caption": c, "references": r.captions}
                                  for k, c, r in zip(keys, captions, records)], settings)
    console.print(f"Report written to {output}")
    return scores


def caption_split(captioner, stores, records, search_cfg, batch_size=100, split=""):
    """The best caption of each record's image, from its cached features, `batch_size` images a search.
    `stores`: the photos' feature cache, and with search_cfg.mirror the mirror images' beside it."""
    row_of = stores[0].row_of()
    rows = torch.tensor([row_of[str(r.image)] for r in records])
    captions = []
    with make_progress(transient=True) as bar:
        task = add_task(bar, f"Captioning {split}", len(records), unit="img")
        for i in range(0, len(records), batch_size):
            feats = torch.cat([load_features(s, rows[i:i + batch_size], captioner.decoder.uses_grid, captioner.device)
                               for s in stores], -1)   # [B, P, C], or the two readings side by side [B, P, 2C]
            captions += [captioner.vocab.decode(h[0].tokens) for h in captioner.search(feats, search_cfg)]
            advance_task(bar, task, len(feats))
    return captions
