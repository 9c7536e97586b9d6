"""The QK-OV interference metric and heatmaps (SPEC section 5)."""
from .._tables import FISHER_SOURCES, VARIANTS
from ..settings import MetricSettings
from .metric import QKOVInterferenceMetric

__all__ = ["QKOVInterferenceMetric", "MetricSettings", "VARIANTS", "FISHER_SOURCES"]
