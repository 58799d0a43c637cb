"""Training: optimizer, losses, checkpoints and the loop (train.py)."""
