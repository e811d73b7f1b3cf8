"""GPU kernels (Triton) for the steps that the PyTorch library leaves slow; each has a
plain-PyTorch path that it must match and that runs wherever the kernel cannot."""
