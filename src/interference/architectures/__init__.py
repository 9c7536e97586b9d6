"""Attention geometry (QKOVConfig), layout adapters and the head indexer."""
from .config import BLOCKS, QKOVConfig
from .indexer import QKOVIndexer, detect_layout
from .registry import LAYOUTS, AttentionLayout, HeadSlices, SplitLayout, register_layout

__all__ = ["BLOCKS", "QKOVConfig", "QKOVIndexer", "detect_layout", "LAYOUTS", "AttentionLayout",
           "HeadSlices", "SplitLayout", "register_layout"]
