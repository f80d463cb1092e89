"""The GAN itself: layers and models, the precision policy, noise and sampling, DiffAugment, the learning-rate
decay, and :class:`~gantrain.engine.gan.step.GANStep` (one optimiser step of D then G)."""
