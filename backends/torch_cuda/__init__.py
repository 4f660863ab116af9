"""PyTorch backend (runs on cuda and cpu)."""
