"""Training data: the JSONL manifest users bring, and a deterministic synthetic generator in that format."""
