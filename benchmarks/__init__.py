"""Microbenchmarks (installed as ``fastformer.benchmarks``; run with ``fastformer bench <op>``)."""
