"""Stage A of MaO: training LoRA adapters on object crops (trainer.py: loop, checkpoints; data.py: pairs and crops)."""
