"""Benchmarks: workload generators, runners and their reports (tables and JSON).

``python -m bench.hit_path`` measures the edge node's exact-hit path; see bench/README.md.
"""

__all__: list[str] = []
