"""Command-line tools: random real-size checkpoints, benchmarks, the concept-world demo."""
