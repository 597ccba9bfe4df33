"""Stage 3: the learned meta-network vote and batch prediction."""
