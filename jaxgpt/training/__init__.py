"""Training: train state, pure steps, losses, optimizer, the Trainer and its hooks, checkpoints,
run configuration, metrics and the sharding report."""
