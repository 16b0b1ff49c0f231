"""Public ops: Triton kernels behind autograd Functions, with reference fallbacks."""
from .abmilp import AbmilpPoolFunction, abmilp_pool
from .attention import AttentionWithStatsFunction, attention_with_stats
from .mlp_scores import mlp_scores
from .softmax_pool import softmax_pool

__all__ = ["AbmilpPoolFunction", "AttentionWithStatsFunction", "abmilp_pool", "attention_with_stats",
           "mlp_scores", "softmax_pool"]
