"""Triton kernels for the fused quantized-LoRA ops (see README.md here). Importing a kernel module
needs triton; this package itself imports nothing."""
