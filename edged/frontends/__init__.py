"""Frontends: wire messages <-> edged.core types, and nothing else."""
