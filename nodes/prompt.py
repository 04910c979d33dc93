"""prompt nodes (being written)."""
NODES = []
