"""The sandbox a RUN step runs in: namespaces, mounts and pivot_root, from the parent and the child side."""
