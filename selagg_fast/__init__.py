"""selagg_fast: fused Selective Aggregation and streaming attention statistics for ViTs."""
import importlib.machinery as _machinery
import os as _os
import sys as _sys


class _CheckoutSubpackages:
    """Finds ``selagg_fast.kernels`` and ``selagg_fast.bench`` in a source checkout.

    The repository keeps ``kernels/`` and ``bench/`` beside this package and setup.py installs them
    as its subpackages. Python run from the repository root imports this folder, not an installed
    copy, so without this finder a non-editable install used from the root has no kernels; with it
    the checkout's own kernels are imported beside the checkout's ops.
    """

    names = ("kernels", "bench")

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in self.names:
            return None
        return _machinery.PathFinder.find_spec(fullname, [self.root])


def _install_checkout_finder() -> None:
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    if _os.path.isdir(_os.path.join(here, "kernels")):  # installed layout: nothing to find
        return
    if not _os.path.isfile(_os.path.join(root, "kernels", "__init__.py")):
        return
    if not any(isinstance(f, _CheckoutSubpackages) for f in _sys.meta_path):
        # first, so that another install's finder (an editable one of another checkout) cannot pair
        # this checkout's ops with its kernels
        _sys.meta_path.insert(0, _CheckoutSubpackages(root))


_install_checkout_finder()

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
