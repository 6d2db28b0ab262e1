"""The runs behind the two CLIs: create_index.py's stages (plan, extract, index, search) and search_index.py's
search."""
