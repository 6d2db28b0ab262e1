"""Retrieval, knowing no model: feature shards on disk, FAISS indexes, exact and streamed ranking, re-ranking,
metrics."""
