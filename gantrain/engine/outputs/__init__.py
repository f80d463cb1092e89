"""What a run shows and writes besides checkpoints: the console and log, metrics.jsonl, grids, plots, the GIF,
experiment trackers, and images or exported generators from a checkpoint."""
