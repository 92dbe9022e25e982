"""The training engine: config loading, the loop, checkpoints, run guards, schedule, precision."""
