"""Type stubs for egresscore.core.inet (compiled; its API is for Cython modules only)."""
