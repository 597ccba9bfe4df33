"""Shared data layer: reading, manifests, splits, transforms, datasets, stage cache and checkpoints."""
