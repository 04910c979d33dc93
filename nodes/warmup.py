"""warmup nodes (being written)."""
NODES = []
