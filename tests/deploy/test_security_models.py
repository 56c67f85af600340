"""Issue 23, model files: a checkpoint or ONNX export from elsewhere cannot make the tool allocate
gigabytes (zip records that inflate, memory.npz headers, config.json sizes, a decoder larger than its
weights) or fetch an encoder's weights from the network. Each is refused in one line before loading."""
import json
import zipfile

import numpy as np
import pytest
import torch

from captioning.inference import captioner as captioner_module
from captioning.inference.captioner import Captioner
from captioning.training.checkpoint import BUILTIN, load_checkpoint
from captioning.deploy.onnx_runtime import CONFIG, GRAPHS, MEMORY, VOCAB, read_config, read_memory
from captioning.utils import CaptioningError


def deflated_copy(src, dst):
    """The same zip members, compressed: torch.load reads them all the same."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zo:
        for info in zi.infolist():
            zo.writestr(info.filename, zi.read(info.filename))
    return dst


def test_a_checkpoint_that_inflates_to_far_more_than_its_size_is_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"format": "image-captioning", "pad": torch.zeros(8_000_000)}, plain)   # 32 MB of zeros
    bomb = deflated_copy(plain, tmp_path / "bomb.pt")
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(CaptioningError, match="would unpack to") as err:
        load_checkpoint(bomb)
    assert "\n" not in str(err.value)


def test_a_memory_npz_that_expands_to_gigabytes_is_refused_from_its_headers(tmp_path):
    path = tmp_path / MEMORY
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("features.npy", "w") as f:   # a header claiming 2.6 GB, then a little data
            np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False,
                                                     "shape": (20_000, 65_536)})
            f.write(b"\0" * 1024)
    with pytest.raises(CaptioningError, match="GB in memory"):
        read_memory(path, 256)


def export_folder(tmp_path, **changes):
    folder = tmp_path / "export"
    folder.mkdir(parents=True)
    for name in [*GRAPHS.values(), VOCAB]:
        (folder / name).write_bytes(b"")
    config = {"format": "image-captioning-onnx", "version": 1, "grid_hw": [7, 7], "feat_dim": 1280,
              "preprocess": {"resize": 232, "crop": 224, "interpolation": "bilinear",
                             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
    config["preprocess"].update(changes)
    (folder / CONFIG).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes", [{"resize": 10 ** 9}, {"crop": 200_000}, {"interpolation": "cubic!"},
                                     {"std": [0, 0, 0]}])
def test_an_onnx_config_with_sizes_out_of_bounds_is_refused(tmp_path, changes):
    assert read_config(export_folder(tmp_path / "ok"))["grid_hw"] == [7, 7]
    with pytest.raises(CaptioningError, match="out of bounds"):
        read_config(export_folder(tmp_path, **changes))


def test_a_configuration_larger_than_its_weights_is_never_built(monkeypatch):
    ckpt = load_checkpoint(BUILTIN)
    ckpt["model_config"] = {**ckpt["model_config"], "hidden_dim": 4096, "embed_dim": 4096}
    built = []
    real = captioner_module.build_decoder

    def recording(config):
        built.append(torch.empty(0).device.type)   # the device new tensors land on while it is built
        return real(config)
    monkeypatch.setattr(captioner_module, "build_decoder", recording)
    with pytest.raises(CaptioningError, match="does not match its own configuration"):
        Captioner(ckpt, device="cpu", source="hostile.pt")
    assert built == ["meta"]


def test_an_encoder_without_local_weights_is_one_sentence_not_a_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    calls = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, *a, **k: calls.append(url) or 1 / 0)
    captioner = Captioner(load_checkpoint(BUILTIN), device="cpu", source=tmp_path / "someones.pt")
    with pytest.raises(CaptioningError, match="not on this machine; nothing was downloaded") as err:
        captioner.encoder()
    assert calls == [] and "\n" not in str(err.value) and captioner.spec.name in str(err.value)
