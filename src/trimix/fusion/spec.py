"""The fusion object: one weight per source and the optional plausibility rule, validated once.

Weights belong to the fusion, not to the loaded models: the same loaded sources serve any number of
fusions (``FusedLM.with_weights``), and the weight search scores many fusions of them at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from trimix.fusion.methods import get_method

PLAUSIBILITY_ALPHA = 0.1  # the default of the plausibility constraint, written once


@dataclass(frozen=True)
class Plausibility:
    """Keep only tokens whose probability under ``role`` is at least ``alpha`` x that source's top one."""

    role: str
    alpha: float = PLAUSIBILITY_ALPHA

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"plausibility alpha must be in (0, 1]; got {self.alpha}")


@dataclass(frozen=True)
class Fusion:
    """A resolved fusion over named sources (raw-logit space: ``L = sum_role w_role * L_role``).

    Attributes:
        weights: role -> finite weight; a weight of 0 leaves that source out of decoding.
        method: the registered method that produced the weights (recorded with every result).
        plausibility: the optional constraint, or None.
    """

    weights: Mapping[str, float]
    method: str = "weighted"
    plausibility: Plausibility | None = None
    options: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = {role: w for role, w in self.weights.items() if not math.isfinite(float(w))}
        if bad:
            raise ValueError(f"fusion weights must be finite; got {bad}")
        if not any(self.weights.values()) and self.plausibility is None:
            raise ValueError("every source has weight 0; nothing to decode with")
        object.__setattr__(self, "weights", {role: float(w) for role, w in self.weights.items()})

    @classmethod
    def resolve(
        cls,
        method: str,
        given: Mapping[str, float | None],
        *,
        role: str | None = None,
        alpha: float = 1.0,
        plausibility: Plausibility | None = None,
    ) -> Fusion:
        """Resolve the weights a user wrote (None where omitted) with a registered method.

        Raises:
            ValueError: unknown method, missing roles, contradicting weights, unknown plausibility role.
        """
        weights = get_method(method).resolve(dict(given), role=role, alpha=alpha)
        if plausibility is not None and plausibility.role not in given:
            raise ValueError(
                f"`plausibility.role` must be one of {', '.join(given)}; got {plausibility.role!r}. "
                "Omit `plausibility` to disable it."
            )
        options = (
            {"role": role} if method == "single" else {"alpha": alpha} if method == "proxy_tuning" else {}
        )
        return cls(weights, method, plausibility, options)

    @property
    def roles(self) -> tuple[str, ...]:
        """The sources a decoder must run: non-zero weight, or the plausibility judge."""
        judge = self.plausibility.role if self.plausibility else None
        return tuple(r for r, w in self.weights.items() if w != 0.0 or r == judge)

    def weight(self, role: str) -> float:
        return self.weights.get(role, 0.0)

    def vector(self, roles: Sequence[str]) -> list[float]:
        """The weights in the order of ``roles`` (0 for a role the fusion does not name)."""
        return [self.weight(r) for r in roles]

    def describe(self) -> str:
        parts = ", ".join(f"{r}={w:g}" for r, w in self.weights.items())
        plaus = (
            f"; plausibility {self.plausibility.role} alpha={self.plausibility.alpha:g}"
            if self.plausibility
            else ""
        )
        return f"{self.method}({parts}){plaus}"

    def to_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "weights": dict(self.weights),
            "plausibility": None
            if self.plausibility is None
            else {"role": self.plausibility.role, "alpha": self.plausibility.alpha},
            **dict(self.options),
        }
