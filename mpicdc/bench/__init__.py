"""Benchmarks that print numbers (ratios against a baseline measured in the same run)."""
