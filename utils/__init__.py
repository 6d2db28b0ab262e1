"""SoIR's base layer (config, errors, files, hub, processes, families, quiet, sweeps: the loose modules) and its
application subpackages (pipeline, queries, results, training, masks, testing) and retrieval (docs/architecture.md)."""
