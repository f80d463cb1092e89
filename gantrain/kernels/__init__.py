"""Custom kernels. A kernel lands here only with a pure-PyTorch reference in the same file, an ``impl=``
switch with a fallback, a test of outputs and gradients, and a `gantrain bench` row showing it beats
torch.compile on the same step. None has cleared that bar yet: on the DCGAN step torch.compile already
fuses BatchNorm + activation and the bf16 convolutions run in oneDNN/cuDNN.
"""
