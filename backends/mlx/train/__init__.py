"""Training on the MLX backend: the loop (`loop.run_training`, called by `parrot.training.train`),
the model set-up (full / LoRA / QLoRA), torch-exact AdamW, checkpoint state and the final export."""
