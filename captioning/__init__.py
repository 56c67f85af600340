"""image-captioning: caption photos with a frozen torchvision CNN and an LSTM decoder.

    from captioning import Captioner
    Captioner.load().caption("photo.jpg")
"""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that the command line's --help and menu never pay for importing torch.
    if name == "Captioner":
        import importlib.util
        if importlib.util.find_spec("torch") is None:   # a deployment from requirements-onnx.txt: exports only
            from captioning.deploy.onnx_runtime import OnnxCaptioner
            return OnnxCaptioner
        from captioning.inference.captioner import Captioner
        return Captioner
    raise AttributeError(name)
