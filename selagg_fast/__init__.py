"""selagg_fast: fused Selective Aggregation and streaming attention statistics for ViTs."""
from .attentive import AttentivePooling
from .efficient import EfficientProbing
from .knn import knn_eval
from .modules import AttentionStatsRecorder, SelectiveAggregation, record_attention_stats
from .ops import AbmilpPoolFunction, AttentionWithStatsFunction, abmilp_pool, attention_with_stats
from .ops import MlpScoresFunction, SoftmaxPoolFunction, mlp_scores, softmax_pool
from .reference import AttentionStats
from .selection import attention_selection

__version__ = "0.1.0"

__all__ = [
    "AbmilpPoolFunction", "AttentionStats", "AttentivePooling", "EfficientProbing", "AttentionStatsRecorder",
    "AttentionWithStatsFunction", "SelectiveAggregation", "abmilp_pool", "attention_selection", "attention_with_stats",
    "knn_eval", "record_attention_stats",
    "__version__", "MlpScoresFunction", "SoftmaxPoolFunction", "mlp_scores", "softmax_pool",
]
