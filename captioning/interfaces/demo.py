"""The offline demo: generate coloured shapes, train a small attention decoder, caption held-out images.

Needs no download: the encoder is a randomly initialised ResNet-18 (its spatial grid still tells colours,
shapes and places apart once standardised), and the data is drawn on the spot. Everything goes under
`<workdir>/demo/`, so the demo never touches the user's own models.
"""
from pathlib import Path

from rich.table import Table

from captioning.utils import console


def demo_configs(epochs=8, seed=0):
    """The demo's encoder and training settings: small and quick, but the real pipeline."""
    from captioning.features.encoders import EncoderSpec
    from captioning.config import ModelConfig
    from captioning.config import TrainConfig
    spec = EncoderSpec(name="resnet18", weights=None, seed=seed)
    model = ModelConfig(decoder="attention", embed_dim=128, hidden_dim=256, attention_dim=128, context_dim=128,
                        dropout=0.2)
    # No mirror images: the shapes' captions say "left" and "right". The plateau schedule learns them in
    # fewer epochs than cosine over a short run.
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=2e-3, min_count=1, patience=epochs, seed=seed,
                      dev_images=200, flip=False, lr_schedule="plateau", model=model)
    return spec, cfg


def caption_is_right(caption, truth):
    """Right when it names the shape's colour, kind and position, and no other colour, kind or position."""
    from captioning.data.synthetic import COLOURS, POSITIONS, SHAPES
    words = set(caption.split())
    named = {w for w in words if w in COLOURS or w in SHAPES or w in POSITIONS}
    return named == {truth["colour"], truth["shape"], truth["position"]}


def run_demo(workdir=".", n_images=600, epochs=8, device="auto", seed=0, show=8):
    """Returns (accuracy on held-out test images, list of (image, caption, truth))."""
    from captioning.inference.captioner import Captioner, caption_files
    from captioning.data.datasets import load_dataset
    from captioning.config import ExtractConfig
    from captioning.results.outputs import OutputConfig
    from captioning.config import SearchConfig
    from captioning.data.synthetic import describe, make_shapes_dataset, shapes_truth, truth_for_image
    from captioning.training.train import train

    home = Path(workdir) / "demo"
    data = home / f"shapes-{n_images}-{seed}"
    if not (data / "captions.json").exists():
        console.print(f"Drawing {n_images} synthetic images in {data} ...")
        make_shapes_dataset(data, n_images=n_images, seed=seed)
    spec, cfg = demo_configs(epochs, seed)
    best = train(data, home, cfg, spec, ExtractConfig(device=device))
    if best is None:
        return 0.0, []

    truth = shapes_truth(data)
    test = load_dataset(data).split("test")
    captioner = Captioner.load(best, device=device)
    # Photo only: a mirrored shape is on the other side, and the captions say which side.
    results = caption_files(captioner, [r.image for r in test], SearchConfig(beam_size=3, mirror=False),
                            OutputConfig(output=home / "captioned"))
    rows = [(r.image, r.captions[0], truth_for_image(truth, r.image)) for r in results]
    accuracy = sum(caption_is_right(c, t) for _, c, t in rows) / max(len(rows), 1)

    table = Table(title=f"Held-out images: {accuracy:.0%} captioned right")
    for col in ("image", "caption", "truth", ""):
        table.add_column(col)
    for image, caption, t in rows[:show]:
        table.add_row(Path(image).name, caption, describe(t), "✓" if caption_is_right(caption, t) else "✗")
    console.print(table)
    console.print(f"Annotated pictures: {home / 'captioned'}")
    return accuracy, rows
