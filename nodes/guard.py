"""guard nodes (being written)."""
NODES = []
