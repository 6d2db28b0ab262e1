"""The Mask Inversion engine: LeGrad maps (legrad.py, fused kernels in legrad_kernels.py), where each family
keeps q/k/v/o (vit_adapters.py), the optimisation (engine.py) and its plain autograd reference (reference.py)."""
