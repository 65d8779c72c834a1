"""The Cython core: per-packet data structures with no I/O."""
