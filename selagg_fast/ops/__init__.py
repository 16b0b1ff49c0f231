"""Public ops: Triton kernels behind autograd Functions, with reference fallbacks."""
from .abmilp import AbmilpPoolFunction, abmilp_pool
from .attention import AttentionWithStatsFunction, attention_with_stats

__all__ = ["AbmilpPoolFunction", "AttentionWithStatsFunction", "abmilp_pool", "attention_with_stats"]
