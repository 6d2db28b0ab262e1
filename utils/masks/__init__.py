"""Object masks for a gallery: OWLv2 boxes -> SAM masks -> captions.pt (creation.py; model loading in models.py)."""
