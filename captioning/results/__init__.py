"""What a caption becomes: PNGs, JSON/JSONL/CSV, sidecars, metadata. Torch-free: both runtimes write through it."""
