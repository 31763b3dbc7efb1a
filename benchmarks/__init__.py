"""Timing scripts comparing :mod:`recurrent` with its peers; see ``benchmarks/README.md``."""
