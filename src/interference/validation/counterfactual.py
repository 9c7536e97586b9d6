"""Per-cell counterfactuals: move one cell along task B's training signal, measure A and B.

For a cell c with parameters S(c), the step Δθ_c changes only S(c) and points along
-ḡ_B,c, task B's mean gradient (over B's scored samples) restricted to the cell:

- ``relative``: ||Δθ_c|| = ``relative`` · ||θ_c||. Every cell moves by the same fraction of
  its own size, so cells are compared at equal relative perturbation, not at whatever size
  B's gradient happens to have there (a global step size made early-layer cells move by a
  third of their norm in the pilot of issue 14, and step size decided the result).
- ``adam``: Δθ_c = -lr · steps · ḡ_B,c / (sqrt(v_B,c) + eps), with v_B the mean squared
  per-sample gradient of B: the displacement ``steps`` Adam steps at ``lr`` would give the
  cell if B's gradient stayed at its mean with its per-sample spread (the step a real
  optimizer takes: sign-like where B agrees with itself, small where it is noise).

ΔL_A(c) = mean_i [L_A,i(θ + Δθ_c) - L_A,i(θ)] over task A's held-out ``eval`` samples, and
ΔL_B(c) likewise; > 0 means the step hurts. The first-order prediction is
<∇L_A^eval, Δθ_c> (a check that the step is small enough to be local, not a candidate).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..gradients.objectives import CausalLMObjective
from .cells import Cell, CellParams
from .losses import BlockCache, block_modules, mean_loss_gradient, sample_losses

STEP_RULES = ("relative", "adam")


@dataclass(frozen=True)
class StepRule:
    """How far a cell moves along -ḡ_B.

    Attributes:
        name: 'relative' or 'adam'.
        relative: 'relative': ||Δθ_c|| as a fraction of ||θ_c||.
        lr: 'adam': the learning rate of the fine-tuning it stands for.
        steps: 'adam': the number of steps it stands for.
        eps: 'adam': Adam's epsilon.
    """

    name: str
    relative: float = 0.05
    lr: float = 1e-4
    steps: int = 50
    eps: float = 1e-8

    def __post_init__(self):
        if self.name not in STEP_RULES:
            raise ValueError(f"step rule {self.name!r} is not one of {STEP_RULES}")
        if not (self.relative > 0 and self.lr > 0 and self.steps >= 1):
            raise ValueError(f"step rule {self.name!r}: relative, lr and steps must be > 0")

    def step(self, theta: torch.Tensor, g_mean: torch.Tensor, g_sq: torch.Tensor) -> torch.Tensor:
        """Δθ_c float32 [size] from the cell's values θ_c, B's mean gradient ḡ_B,c and mean
        squared gradient v_B,c (all [size])."""
        if self.name == "relative":
            norm = g_mean.norm()
            if norm == 0:
                return torch.zeros_like(g_mean)
            return -g_mean / norm * (self.relative * theta.norm())
        return -self.lr * self.steps * g_mean / (g_sq.sqrt() + self.eps)


@dataclass
class Counterfactuals:
    """Measured per-cell effects of one step rule.

    Attributes:
        rule: the step rule.
        cells: the cells, in row order.
        delta_a: [n_cells, n_eval_a] per-sample change of task A's loss (nats).
        delta_b: [n_cells, n_eval_b] the same for task B.
        predicted_a / predicted_b: [n_cells] first-order predictions <∇L^eval, Δθ_c>.
        steps: cell -> Δθ_c, float32 [size] on the CPU.
        step_norm / theta_norm: [n_cells] ||Δθ_c|| and ||θ_c||.
        base_a / base_b: [n_eval] losses of the unchanged model.
    """

    rule: StepRule
    cells: list[Cell]
    delta_a: np.ndarray
    delta_b: np.ndarray
    predicted_a: np.ndarray
    predicted_b: np.ndarray
    step_norm: np.ndarray
    theta_norm: np.ndarray
    base_a: np.ndarray
    base_b: np.ndarray
    steps: dict = field(default_factory=dict)


def _caches(model, objective, params: CellParams) -> tuple | None:
    """Block caches for eval A and B when the blocks below a cell can be skipped: a causal
    LM with every layer indexed (else None: full forward passes)."""
    ix = params.indexer
    if not isinstance(objective, CausalLMObjective) or ix.layers != ix.all_layers:
        return None
    paths = [ix.entry(layer, "Q").parts[0].name.rsplit(".", 1)[0] for layer in ix.layers]
    try:
        blocks = block_modules(model, paths)
    except ValueError:
        return None
    return BlockCache(blocks), BlockCache(blocks)


def _losses(model, objective, batch, micro_batch, cache, position):
    if cache is None or position == 0:
        return sample_losses(model, objective, batch, micro_batch).cpu()
    with cache.skipping_below(position):
        return sample_losses(model, objective, batch, micro_batch).cpu()


def measure(model, objective, params: CellParams, cells: list[Cell], rule: StepRule,
            g_mean: dict[Cell, torch.Tensor], g_sq: dict[Cell, torch.Tensor],
            eval_a: dict, eval_b: dict, micro_batch: int = 16,
            progress: bool = True, skip_unchanged: bool = True) -> Counterfactuals:
    """Step each cell alone by ``rule`` (restored bitwise after), measure A and B.

    ``skip_unchanged``: a cell of layer l cannot change the outputs of the blocks below l,
    so those are taken from the unchanged model's forward pass (causal LMs; checked
    against a full forward pass on the first cell it applies to)."""
    model.eval()
    names = list(dict.fromkeys(n for c in cells for n, _ in params.parts(c)))
    full_a = mean_loss_gradient(model, objective, eval_a, names, micro_batch)
    full_b = mean_loss_gradient(model, objective, eval_b, names, micro_batch)
    grad_a = {c: params.read(c, full_a) for c in cells}
    grad_b = {c: params.read(c, full_b) for c in cells}
    caches = _caches(model, objective, params) if skip_unchanged else None
    if caches is None:
        base_a = sample_losses(model, objective, eval_a, micro_batch).cpu()
        base_b = sample_losses(model, objective, eval_b, micro_batch).cpu()
    else:
        with caches[0].recording():
            base_a = sample_losses(model, objective, eval_a, micro_batch).cpu()
        with caches[1].recording():
            base_b = sample_losses(model, objective, eval_b, micro_batch).cpu()
    position = {layer: k for k, layer in enumerate(params.indexer.layers)}
    steps: dict[Cell, torch.Tensor] = {}
    checked = False
    n = len(cells)
    delta_a = np.zeros((n, len(base_a)))
    delta_b = np.zeros((n, len(base_b)))
    pred_a, pred_b, step_norm, theta_norm = (np.zeros(n) for _ in range(4))
    for k, c in enumerate(tqdm(cells, desc=f"counterfactuals ({rule.name})",
                               disable=not progress, mininterval=5)):
        theta = params.read(c)
        step = rule.step(theta, g_mean[c].to(theta.device), g_sq[c].to(theta.device))
        pos = position[c.layer]
        with params.shifted(c, step):
            la = _losses(model, objective, eval_a, micro_batch, caches and caches[0], pos)
            lb = _losses(model, objective, eval_b, micro_batch, caches and caches[1], pos)
            if caches is not None and pos > 0 and not checked:
                full = sample_losses(model, objective, eval_a, micro_batch).cpu()
                if not torch.allclose(full, la, rtol=1e-5, atol=1e-6):
                    raise RuntimeError(f"skipping the blocks below {c.name} changed the "
                                       f"losses (max diff {float((full - la).abs().max()):.3g})"
                                       "; run with skip_unchanged=False")
                checked = True
        delta_a[k] = (la.double() - base_a.double()).numpy()
        delta_b[k] = (lb.double() - base_b.double()).numpy()
        pred_a[k] = float(torch.dot(grad_a[c].double(), step.double().to(grad_a[c].device)))
        pred_b[k] = float(torch.dot(grad_b[c].double(), step.double().to(grad_b[c].device)))
        step_norm[k], theta_norm[k] = float(step.norm()), float(theta.norm())
        steps[c] = step.cpu()
    after = sample_losses(model, objective, eval_a, micro_batch).cpu()
    exact = after.device.type == "cpu"
    if not (torch.equal(after, base_a) if exact else torch.allclose(after, base_a, atol=1e-5)):
        raise RuntimeError("the model changed during the counterfactuals: a cell was not "
                           "restored bitwise")
    return Counterfactuals(rule, list(cells), delta_a, delta_b, pred_a, pred_b, step_norm,
                           theta_norm, base_a.numpy(), base_b.numpy(), steps)
