"""SoIR utilities: Mask Inversion engine, metrics, preprocessing, feature and index I/O, config schema."""
