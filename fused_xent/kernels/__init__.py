"""Triton kernels of fused_xent: one file per kernel family, each launcher under its kernel."""
