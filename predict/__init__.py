"""Batch prediction: the trained pipeline over photos (rows, sharding and merging, truth scoring, the report)."""
