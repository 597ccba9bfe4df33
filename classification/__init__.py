"""Stage 2: SE-augmented CNN classifiers on the lesion crops."""
