"""The synchronous trainer and its components: optimizer + schedule, checkpoints, metrics."""
