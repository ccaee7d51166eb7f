"""Benchmarks: each module measures weavepy against its anchor in the same run."""
