"""Attention geometry (QKOVConfig), layout adapters, generic discovery, the head indexer
and the functional proof of a layout (``proof``)."""
from .config import BLOCKS, QKOVConfig
from .indexer import QKOVIndexer, detect_layout
from .registry import LAYOUTS, AttentionLayout, HeadSlices, SplitLayout, register_layout

__all__ = ["BLOCKS", "QKOVConfig", "QKOVIndexer", "detect_layout", "LAYOUTS", "AttentionLayout",
           "HeadSlices", "SplitLayout", "register_layout"]
