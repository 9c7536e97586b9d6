"""Where the library computes: the one rule for choosing a torch device."""
from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(want: str | None = "auto", what: str = "device") -> str:
    """'cpu' or 'cuda' for a requested device: ``auto`` (or None) is CUDA when a CUDA device
    is visible, else the CPU; ``cuda`` without a visible CUDA device is an error naming
    ``what`` (the setting that asked for it). Any other torch device string (``cuda:1``,
    ``mps``) is returned as given."""
    want = str(want) if want else "auto"
    if want == "cpu":
        return "cpu"
    import torch

    if want not in DEVICES:
        return want
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{what}=cuda but no CUDA device is visible")
    return "cuda" if torch.cuda.is_available() else "cpu"
