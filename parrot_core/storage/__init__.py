"""Files: safetensors reading and writing, hub downloads, outputs written atomically under the output rule."""
