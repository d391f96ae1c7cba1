"""Filesystems of steps: the build context, copying, overlay snapshots, and layer tars in and out."""
