"""``from fisher.qkov import QKOVConfig, QKOVInterferenceMetric, QKOVStatistics``."""
from interference.architectures import QKOVConfig, QKOVIndexer
from interference.scores import QKOVInterferenceMetric


def __getattr__(name):
    if name == "QKOVStatistics":
        from interference.stats import QKOVStatistics
        return QKOVStatistics
    raise AttributeError(name)


__all__ = ["QKOVConfig", "QKOVIndexer", "QKOVInterferenceMetric", "QKOVStatistics"]
