"""Command-line tools (latent extraction, sampling, checkpoint conversion, run cost estimates)."""
