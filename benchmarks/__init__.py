"""Performance benchmarks of unet_ray; run `python -m benchmarks.run` from the repository root."""
