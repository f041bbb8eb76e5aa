"""Benchmarks of the toolkit's fast paths against their plain references (`bganalysis bench`)."""
