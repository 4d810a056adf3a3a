"""The toy world: a synthetic instruction world and the small models trained on it, on CPU."""
