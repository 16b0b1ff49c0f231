"""@triton.jit kernels only; installed as ``selagg_fast.kernels``."""
