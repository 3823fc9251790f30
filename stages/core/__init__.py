"""Shared machinery of the stages: config, fingerprints, store, models, generation, I/O."""
