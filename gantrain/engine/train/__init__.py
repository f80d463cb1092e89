"""The training loop: :class:`~gantrain.engine.train.loop.Trainer`, its statistics and ``--dry-run``."""
