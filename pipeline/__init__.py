"""The whole pipeline in one command (`dermpipe run`), its stage checks, and the synthetic demo."""
