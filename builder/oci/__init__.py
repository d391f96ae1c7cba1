"""OCI images: their JSON, the local store, and archives and directories written from it."""
