"""The machinery every stage uses: run setup, the one training loop, the stage cache, checkpoints, CLI plumbing."""
