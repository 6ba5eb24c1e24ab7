"""API keys: their format, digest, model and cache."""
