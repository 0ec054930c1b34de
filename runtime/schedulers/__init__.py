"""Numpy ports of diffusers schedulers."""
