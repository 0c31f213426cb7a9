"""Native kernels that PyTorch lacks a fast path for; every one has a PyTorch fallback that stays the reference."""
