"""Execution back-ends of the dynamic convolution engine (fused kernels, imported on demand)."""
