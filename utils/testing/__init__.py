"""Random models built from configs: tiny ones saved to disk for the tests and the offline demo
(tiny_models.py; scripts/make_tiny_models.py is its CLI) and full-size ones for the benchmarks (full_size.py)."""
