"""Experiments on pruned models: evaluation, sweeps, linear probes, tuning, statistics, tables, benchmarks."""
