"""sampling nodes (being written)."""
NODES = []
