"""Environments stepped on the CPU side while the model runs under jit."""
