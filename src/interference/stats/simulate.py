"""Synthetic disruption matrices for the calibration harness (scripts/calibrate_stats.py)
and the fast calibration tests: the designs where the choice of cell test was made.

A design draws shares x_B [n_B, m] and x_R [n_R, m] for m cells laid out in layers of
``layer_size`` cells. Per disruptor, a latent z [m] is standard normal with correlation
``rho`` between the cells of one layer (a shared layer factor); the share is
``loc + scale * g(z)`` with g monotone:

- ``normal``: g(z) = z;
- ``heavy``: Tukey's h, g(z) = z exp(h z^2 / 2), h = 0.2 (symmetric, moments up to 4);
- ``right``: g(z) = exp(z) (log-normal, right-skewed); ``left``: g(z) = -exp(z).

R has loc 0 and scale 1; B has scale ``ratio`` and the loc that makes the NULL OF THE TEST
under study hold exactly at every unplanted cell: equal means (``null='mean'``, what Welch's
t and the mean difference test) or P(x_B > x_R) = 1/2 (``null='auc'``, what the rank test
tests). For symmetric shapes, and for ratio 1, the two coincide. Planted cells add
d * sd_pooled to B (Cohen's d = d in the population).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("normal", "heavy", "right", "left")
NULLS = ("mean", "auc")
TUKEY_H = 0.2


@dataclass(frozen=True)
class Design:
    """One design of the grid: group sizes, spread ratio sd_B/sd_R (on g's scale), shape,
    within-layer correlation of the latent z, and whose null holds at unplanted cells."""

    n_b: int
    n_r: int
    ratio: float
    shape: str
    rho: float = 0.3
    null: str = "mean"

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.null not in NULLS:
            raise ValueError(f"unknown null {self.null!r}; expected one of {NULLS}")
        if not 0 <= self.rho < 1 or self.ratio <= 0:
            raise ValueError("rho must be in [0, 1) and ratio > 0")

    @property
    def label(self) -> str:
        return f"{self.n_b}/{self.n_r}, sd ratio {self.ratio:g}, {self.shape}"


def g(z: np.ndarray, shape: str) -> np.ndarray:
    """The monotone map from the latent normal z to a share (before loc and scale)."""
    if shape == "normal":
        return z
    if shape == "heavy":
        return z * np.exp(TUKEY_H * z * z / 2.0)
    if shape == "right":
        return np.exp(z)
    if shape == "left":
        return -np.exp(z)
    raise ValueError(f"unknown shape {shape!r}")


def _moments(shape: str) -> tuple[float, float]:
    """(mean, sd) of g(z) for z ~ N(0, 1), in closed form."""
    if shape == "normal":
        return 0.0, 1.0
    if shape == "heavy":                 # E z^2 exp(h z^2) = (1 - 2h)^(-3/2)
        return 0.0, float((1.0 - 2.0 * TUKEY_H) ** -0.75)
    mean = float(np.exp(0.5))
    sd = float(np.sqrt((np.exp(1.0) - 1.0) * np.exp(1.0)))
    return (mean, sd) if shape == "right" else (-mean, sd)


def b_location(shape: str, ratio: float, null: str, n_mc: int = 4_000_000,
               seed: int = 12345) -> float:
    """loc of B making the null hold: (1 - ratio) * E g(z) for 'mean'; for 'auc', minus the
    median of ratio * g(z1) - g(z2) (Monte Carlo with n_mc draws; 0 by symmetry for the
    symmetric shapes and for ratio 1)."""
    mean, _ = _moments(shape)
    if null == "mean":
        return (1.0 - ratio) * mean
    if shape in ("normal", "heavy") or ratio == 1.0:
        return 0.0
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((2, n_mc))
    return -float(np.median(ratio * g(z[0], shape) - g(z[1], shape)))


def pooled_sd(design: Design) -> float:
    """Population pooled sd of the shares, n-1 weights (Cohen's d's denominator)."""
    _, sd = _moments(design.shape)
    sd_b, sd_r = design.ratio * sd, sd
    nb, nr = design.n_b, design.n_r
    return float(np.sqrt(((nb - 1) * sd_b ** 2 + (nr - 1) * sd_r ** 2) / (nb + nr - 2)))


def _latent(rng: np.random.Generator, n: int, m: int, layer_size: int, rho: float
            ) -> np.ndarray:
    n_layers = -(-m // layer_size)
    layer = np.repeat(rng.standard_normal((n, n_layers)), layer_size, axis=1)[:, :m]
    return np.sqrt(rho) * layer + np.sqrt(1.0 - rho) * rng.standard_normal((n, m))


def draw(design: Design, rng: np.random.Generator, m: int = 720, layer_size: int = 24,
         planted: dict[int, float] | None = None, loc: float | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """(x_b [n_B, m], x_r [n_R, m]) for one run; planted: {cell: Cohen's d}; loc: B's
    location if already computed (:func:`b_location`)."""
    if loc is None:
        loc = b_location(design.shape, design.ratio, design.null)
    x_b = loc + design.ratio * g(_latent(rng, design.n_b, m, layer_size, design.rho),
                                 design.shape)
    x_r = g(_latent(rng, design.n_r, m, layer_size, design.rho), design.shape)
    if planted:
        sd = pooled_sd(design)
        for cell, d in planted.items():
            x_b[:, cell] += d * sd
    return x_b, x_r
