"""Structured pruning core: models, structure discovery, masks, slicing, allocation, data and methods."""
