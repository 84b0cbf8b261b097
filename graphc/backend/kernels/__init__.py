"""The kernel families, each specialized to static shapes and the target's vectors."""
