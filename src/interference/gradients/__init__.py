"""Per-sample gradients, the gradient store and the Fisher (SPEC sections 3-4)."""
from .factored import GRADIENT_FORMATS, FactorLayout
from .fisher import FisherBank, FisherCollector, TaskFisher
from .objectives import OBJECTIVES, CausalLMObjective, Objective, default_objective, register_objective
from .per_sample import NonFiniteGradientError, PerSampleGradients
from .store import ContributionCache, GradientStore, natural_key

__all__ = ["FisherBank", "FisherCollector", "TaskFisher", "OBJECTIVES", "CausalLMObjective",
           "Objective", "default_objective", "register_objective", "NonFiniteGradientError",
           "PerSampleGradients", "ContributionCache", "GradientStore", "natural_key",
           "GRADIENT_FORMATS", "FactorLayout"]
