"""Fast building blocks: the same parameters as nextrec's layers, batched computation."""
