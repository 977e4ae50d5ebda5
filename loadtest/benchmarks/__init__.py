"""Benchmarks that produce the figures quoted in the README."""
