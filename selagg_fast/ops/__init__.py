"""Public ops: Triton kernels behind autograd Functions, with reference fallbacks."""
from .abmilp import AbmilpPoolFunction, abmilp_pool

__all__ = ["AbmilpPoolFunction", "abmilp_pool"]
