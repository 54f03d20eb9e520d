"""Shared memory: the file format of SHM_DIR and its writers and readers. Below
everything: imports nothing else of counter."""
