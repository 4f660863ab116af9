"""Model backends: `torch_cuda` (PyTorch, cpu/cuda) and `mlx` (Apple MLX)."""
