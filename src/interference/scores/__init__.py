"""The QK-OV interference metric and heatmaps (SPEC section 5).

Each name loads with its module on first use (interference._lazy): the join of saved
chunks (.join) runs without torch."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "interference._tables": ("FISHER_SOURCES", "VARIANTS"),
    "interference.settings": ("MetricSettings",),
    ".metric": ("QKOVInterferenceMetric",),
})
