"""Content-addressed blob store and the index from step cache keys to layers."""
