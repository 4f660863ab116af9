"""MLX backend. Never imports torch."""
