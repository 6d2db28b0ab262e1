"""Own queries: an image, a mask or a text searched against a features folder made earlier."""
