"""berth benchmarks: latency of every calling method (serving), peers comparison (peers)."""
