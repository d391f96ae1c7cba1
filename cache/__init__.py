"""Caching, with no knowledge of how images are built: blobs, step keys and their index, leases, collection."""
