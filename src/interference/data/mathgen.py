"""Offline, seeded generation of DeepMind `mathematics_dataset` problems.

The package (v1.0.1) needs two adaptations, applied once on first use:

- sympy >= 1.7 moved `base_solution_linear`; it is re-exported into
  `sys.modules['sympy.solvers.diophantine']` before the package is imported.
- `composition.Context.pop` picks a variable letter with `random.choice(list(a_set))`,
  whose order depends on PYTHONHASHSEED; it is replaced by the same code over
  `sorted(a_set)`, so problems do not change between processes.

Each problem is seeded on its own: Python's `random`, numpy's global generator and
sympy's `sympy.core.random` generator all get a 32-bit seed derived (SHA-256) from
(seed, difficulty, module, index, attempt). A problem redrawn (too long, or a question
already generated earlier in the list) moves to the next attempt, so the first n problems
of a list are the same whatever larger n is asked for (prefix-stable).

Only the non-"composed" modules are offered: under numpy 2 the composed ones fail
10-100% of the time (`np.object`, `ndarray.itemset`) and, even when they succeed,
still depend on PYTHONHASHSEED. Of the plain modules, `calculus__differentiate` and
`polynomials__{add,coefficient_named,collect,compose,expand}` always fail under numpy 2.
"""

from __future__ import annotations

import hashlib
import importlib
import random
import sys
import warnings
from typing import Callable

import numpy as np

# Plain modules that work under numpy 2 + sympy 1.14 and are reproducible across
# processes (checked: 300 problems each, PYTHONHASHSEED 1 vs 2). ms/problem on 1 core.
WORKING_MODULES: dict[str, float] = {
    "algebra__linear_1d": 0.7,
    "algebra__linear_2d": 0.9,
    "algebra__polynomial_roots": 4.2,
    "algebra__sequence_next_term": 1.6,
    "algebra__sequence_nth_term": 1.6,
    "arithmetic__add_or_sub": 0.3,
    "arithmetic__add_or_sub_in_base": 0.2,
    "arithmetic__add_sub_multiple": 0.3,
    "arithmetic__div": 0.2,
    "arithmetic__mixed": 0.6,
    "arithmetic__mul": 0.2,
    "arithmetic__mul_div_multiple": 0.6,
    "arithmetic__nearest_integer_root": 0.6,
    "arithmetic__simplify_surd": 6.1,
    "comparison__closest": 0.7,
    "comparison__kth_biggest": 0.7,
    "comparison__pair": 0.4,
    "comparison__sort": 0.6,
    "measurement__conversion": 1.7,
    "measurement__time": 0.1,
    "numbers__base_conversion": 0.1,
    "numbers__div_remainder": 0.2,
    "numbers__gcd": 0.3,
    "numbers__is_factor": 0.2,
    "numbers__is_prime": 0.2,
    "numbers__lcm": 0.4,
    "numbers__list_prime_factors": 0.1,
    "numbers__place_value": 0.1,
    "numbers__round_number": 0.2,
    "polynomials__evaluate": 1.6,
    "polynomials__simplify_power": 1.1,
    "probability__swr_p_level_set": 37.0,
    "probability__swr_p_sequence": 11.0,
}

# Default mix: arithmetic, linear algebra, number theory and comparison, all < 2 ms.
DEFAULT_MATH_MODULES: tuple[str, ...] = (
    "algebra__linear_1d",
    "algebra__linear_2d",
    "algebra__sequence_next_term",
    "arithmetic__add_or_sub",
    "arithmetic__add_sub_multiple",
    "arithmetic__div",
    "arithmetic__mixed",
    "arithmetic__mul",
    "arithmetic__mul_div_multiple",
    "comparison__closest",
    "comparison__kth_biggest",
    "comparison__sort",
    "numbers__div_remainder",
    "numbers__gcd",
    "numbers__is_prime",
    "numbers__lcm",
)

# Entropy sub-ranges of the package's `train` regime (generate._make_entropy_fn).
_DIFFICULTY = {"all": (0, 1), "easy": (0, 3), "medium": (1, 3), "hard": (2, 3)}
_MAX_ATTEMPTS = 200
_modules_cache: dict[str, dict[str, Callable]] = {}


def _import_package():
    """Imports mathematics_dataset with the sympy and hash-order fixes applied."""
    diophantine = importlib.import_module("sympy.solvers.diophantine.diophantine")
    package = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(package, "base_solution_linear"):
        package.base_solution_linear = diophantine.base_solution_linear
    sys.modules["sympy.solvers.diophantine"] = package
    from mathematics_dataset import generate_settings
    from mathematics_dataset.modules import modules
    from mathematics_dataset.util import composition

    if not getattr(composition.Context.pop, "_interference_sorted", False):

        def pop(self):  # same as the original, over a sorted list
            allowed = (composition._ALLOWED_SYMBOLS
                       .difference(self._relation_symbols)
                       .difference(self._self_symbols)
                       .difference(self._child_symbols))
            if not allowed:
                raise ValueError("Ran out of symbols")
            symbol = random.choice(sorted(allowed))
            self._self_symbols.add(symbol)
            return symbol

        pop._interference_sorted = True
        composition.Context.pop = pop
    return modules, generate_settings


def _flatten(tree: dict, prefix: str | None = None) -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    for key, value in tree.items():
        name = key if prefix is None else f"{prefix}__{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def _module_table(difficulty: str) -> dict[str, Callable]:
    if difficulty not in _DIFFICULTY:
        raise ValueError(f"difficulty must be one of {sorted(_DIFFICULTY)}, got {difficulty!r}")
    if difficulty not in _modules_cache:
        modules, _ = _import_package()
        level, n_levels = _DIFFICULTY[difficulty]
        lo, hi = level / n_levels, (level + 1) / n_levels

        def entropy_fn(range_):
            return (range_[0] + lo * (range_[1] - range_[0]),
                    range_[0] + hi * (range_[1] - range_[0]))

        _modules_cache[difficulty] = _flatten(modules.train(entropy_fn))
    return _modules_cache[difficulty]


def _seed_all(value: int) -> None:
    import sympy.core.random as sympy_random

    random.seed(value)
    np.random.seed(value)
    sympy_random.seed(value)


def derived_seed(*parts: object) -> int:
    """A 32-bit seed from SHA-256 of the parts (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def generate_math(n: int, seed: int = 0, modules: tuple[str, ...] | list[str] = DEFAULT_MATH_MODULES,
                  difficulty: str = "all") -> list[tuple[str, int, str, str]]:
    """Generates n problems, round-robin over `modules` (problem r: module r % M, index r // M).

    Returns a list of (module, index, question, answer) strings. Questions longer than
    160 characters or answers longer than 30 (the package's limits) and questions
    already generated are redrawn with the next attempt seed. The state of `random`,
    numpy's and sympy's global generators is saved and restored around the call.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    modules = list(modules)
    if not modules:
        raise ValueError("modules is empty")
    unknown = [m for m in modules if m not in WORKING_MODULES]
    if unknown:
        raise ValueError(f"unsupported math modules {unknown}; supported: {sorted(WORKING_MODULES)}")
    if len(set(modules)) != len(modules):
        raise ValueError(f"duplicate math modules in {modules}")
    table = _module_table(difficulty)
    _, settings = _import_package()
    import sympy.core.random as sympy_random

    saved = (random.getstate(), np.random.get_state(), sympy_random.rng.getstate())
    seen: set[str] = set()
    out: list[tuple[str, int, str, str]] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for r in range(n):
                module, index = modules[r % len(modules)], r // len(modules)
                for attempt in range(_MAX_ATTEMPTS):
                    _seed_all(derived_seed(seed, difficulty, module, index, attempt))
                    problem = table[module]()
                    question, answer = str(problem.question), str(problem.answer)
                    if (len(question) <= settings.MAX_QUESTION_LENGTH
                            and len(answer) <= settings.MAX_ANSWER_LENGTH
                            and question not in seen):
                        break
                else:
                    raise RuntimeError(f"math module {module}: no new problem in {_MAX_ATTEMPTS} attempts "
                                       f"(index {index}); ask for fewer problems")
                seen.add(question)
                out.append((module, index, question, answer))
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        sympy_random.rng.setstate(saved[2])
    return out
