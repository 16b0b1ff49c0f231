"""selagg_fast: fused Selective Aggregation and streaming attention statistics for ViTs."""
from .modules import SelectiveAggregation
from .ops import AbmilpPoolFunction, abmilp_pool
from .reference import AttentionStats

__version__ = "0.1.0"

__all__ = ["AbmilpPoolFunction", "AttentionStats", "SelectiveAggregation", "abmilp_pool", "__version__"]
