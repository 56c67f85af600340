"""Datasets: layouts on disk, loaders, the vocabulary, the Kaggle download, the demo's shapes."""
