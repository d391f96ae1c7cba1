"""OCI registries: pulling base images, pushing built ones, and the credentials both use (Distribution API v2)."""
