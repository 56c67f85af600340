"""ONNX export and the torch-free runtime that captions with it."""
