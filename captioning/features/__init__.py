"""Image decoding, encoders (and their classifier heads), extraction, the feature cache, fast settings."""
