"""From a parsed Dockerfile to an OCI image: build graph, sandboxed steps, layers, export."""
