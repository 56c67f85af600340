"""The Python API: Captioner."""
