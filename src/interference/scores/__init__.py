"""The QK-OV interference metric and heatmaps (SPEC section 5)."""
from .metric import FISHER_SOURCES, VARIANTS, QKOVInterferenceMetric

__all__ = ["QKOVInterferenceMetric", "VARIANTS", "FISHER_SOURCES"]
