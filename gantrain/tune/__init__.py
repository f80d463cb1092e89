"""`gantrain tune` (Ray Tune search over lr_G, lr_D and label smoothing) lives here; not built yet."""
