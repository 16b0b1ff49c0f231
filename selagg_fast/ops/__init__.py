"""Public ops: Triton kernels behind autograd Functions, with reference fallbacks."""
from .abmilp import AbmilpPoolFunction, abmilp_pool
from .attention import AttentionWithStatsFunction, attention_with_stats
from .mlp_scores import MlpScoresFunction, mlp_scores
from .softmax_pool import SoftmaxPoolFunction, softmax_pool

__all__ = ["AbmilpPoolFunction", "AttentionWithStatsFunction", "abmilp_pool", "attention_with_stats",
           "MlpScoresFunction", "SoftmaxPoolFunction", "mlp_scores", "softmax_pool"]
