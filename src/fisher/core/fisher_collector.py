"""``from fisher.core.fisher_collector import FisherCollector`` (the seed's path)."""
from interference.gradients.fisher import FisherCollector

__all__ = ["FisherCollector"]
