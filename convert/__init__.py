"""Layout conversion between official, MLX, DeepSpeed and DCP checkpoints."""
