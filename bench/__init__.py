"""Benchmarks: one script per performance question, each printing a table and writing JSON to bench/results/."""
