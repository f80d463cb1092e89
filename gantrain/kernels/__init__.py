"""Custom kernels, each with its pure-PyTorch reference in the same file, an ``impl=`` switch with a fallback
where it does not apply (shape or device), and a test of outputs and both gradients against the reference
(``tests/unit/kernels/test_kernels.py``). This layer imports nothing else from gantrain.

* :mod:`gantrain.kernels.conv`: the DCGAN convolutions in exact faster forms (the dense ends as matrix
  products; on CPU, space-to-depth input gradients and dilated-forward weight gradients, each layer's chosen
  by timing it against torch's: ``measure_rewrite``, ``set_rewrites``), measured by the ``+ fast layers`` row of
  ``gantrain bench``.
"""
