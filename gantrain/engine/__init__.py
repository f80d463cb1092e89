"""The training engine: config, data, models, precision, loop, checkpoint and logging."""
