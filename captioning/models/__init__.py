"""The decoders: their contract, registry and ensembles."""
