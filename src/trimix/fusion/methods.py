"""Fusion methods as small registered classes, the way mergekit registers merge methods.

A method says which roles it needs, how the weights a user writes (some may be missing) become one
weight per source, and which baseline candidates the label-free weight search scores beside its
grid. Adding a method is one class here (or in any module imported before use) with
``@register_method``; the config, the CLI choices and ``trimix ls methods`` read the registry.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from trimix.fusion.math import fuse_rows

LARGE, SMALL_CPT, SMALL_BASE = "large", "small_cpt", "small_base"
PAPER_ROLES = (LARGE, SMALL_CPT, SMALL_BASE)
_TOLERANCE = 1e-6


class FusionMethod(ABC):
    """How one family of fusions turns the weights a user writes into a weight per source.

    Attributes:
        name: the registry key (``fusion.method`` in a config).
        summary: one line for ``trimix ls methods``.
        required_roles: roles that must be present among the sources.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    required_roles: ClassVar[tuple[str, ...]] = ()
    # A linear method fuses L = sum_i w_i L_i with fixed weights: the scorer then computes many weight
    # combinations from one forward (factorised log-partition), and the weight search applies. A method
    # whose weights depend on the logits is scored by fusing the full logits.
    linear: ClassVar[bool] = True

    def combine(
        self, logits: Sequence[torch.Tensor], weights: torch.Tensor, vocab: int | None
    ) -> torch.Tensor:
        """The fused logits a decoder or scorer uses: ``(B, ..., V)`` float32 from one ``(B, ..., R_i)``
        tensor per source and the ``(B, N)`` weights each row carries (the resolved weights)."""
        return fuse_rows(logits, weights, vocab)

    @abstractmethod
    def resolve(
        self, given: Mapping[str, float | None], *, role: str | None = None, alpha: float = 1.0
    ) -> dict[str, float]:
        """One finite weight per role in ``given`` (0 for a source the method leaves out).

        Args:
            given: role -> the weight the user wrote, or None where none was written.
            role: the method's ``fusion.role`` option (single).
            alpha: the method's ``fusion.alpha`` option (proxy_tuning).

        Raises:
            ValueError: missing roles, or written weights that contradict the method.
        """

    def baselines(self, roles: Sequence[str]) -> list[tuple[str, dict[str, float]]]:
        """Candidates the weight search scores beside its grid, as ``(kind, role -> weight)``: each source
        alone and, when the paper's three roles are there, Proxy Tuning (the baseline TriMix beats)."""
        found = [("single", {r: float(r == role) for r in roles}) for role in roles]
        if set(PAPER_ROLES) <= set(roles):
            proxy = {LARGE: 1.0, SMALL_CPT: 1.0, SMALL_BASE: -1.0}
            found.append(("proxy_tuning", {r: proxy.get(r, 0.0) for r in roles}))
        return found

    def _require(self, given: Mapping[str, float | None]) -> None:
        missing = [r for r in self.required_roles if r not in given]
        if missing:
            raise ValueError(
                f"fusion method {self.name!r} needs sources with roles {', '.join(self.required_roles)}; "
                f"missing {missing}. Add them under `models`, or use method 'weighted' with explicit weights."
            )
        extra = [r for r in given if r not in self.required_roles and given[r] not in (None, 0.0)]
        if extra:
            raise ValueError(
                f"fusion method {self.name!r} fuses only {', '.join(self.required_roles)}; source(s) {extra} "
                "carry a weight. Remove them, set their weight to 0, or use method 'weighted'."
            )

    def _agree(self, role: str, given: float | None, derived: float) -> None:
        if given is not None and abs(given - derived) > _TOLERANCE:
            raise ValueError(
                f"source {role!r} has weight {given} but method {self.name!r} sets it to {derived:g}; "
                "remove that `weight` or use method 'weighted'."
            )


METHODS: dict[str, FusionMethod] = {}


def register_method(cls: type[FusionMethod]) -> type[FusionMethod]:
    """Class decorator: make a method available by its ``name``."""
    if cls.name in METHODS:
        raise ValueError(f"fusion method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> FusionMethod:
    """The registered method called ``name``.

    Raises:
        ValueError: unknown name, with the closest registered one.
    """
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown fusion method {name!r}.{hint} Available: {', '.join(METHODS)} (see `trimix ls methods`)"
        )
    return METHODS[name]


@register_method
class Weighted(FusionMethod):
    name = "weighted"
    summary = "every source carries an explicit weight (0 leaves it out)"

    def resolve(self, given, *, role=None, alpha=1.0):
        missing = [r for r, w in given.items() if w is None]
        if missing:
            raise ValueError(
                f"fusion method 'weighted' needs a `weight` on every source; {missing} have none. "
                "Give them a weight (0 to leave a source out) or use method 'trimix'."
            )
        return {r: float(w) for r, w in given.items() if w is not None}


@register_method
class Single(FusionMethod):
    name = "single"
    summary = "one source alone (fusion.role); no other source is loaded"

    def resolve(self, given, *, role=None, alpha=1.0):
        if role not in given:
            raise ValueError(
                f"fusion method 'single' needs `fusion.role` naming a source ({', '.join(given)}); got {role!r}"
            )
        for r, w in given.items():
            self._agree(r, w, 1.0 if r == role else 0.0)
        return {r: float(r == role) for r in given}


@register_method
class ProxyTuning(FusionMethod):
    name = "proxy_tuning"
    summary = "L_large + alpha * (L_small_cpt - L_small_base) (Liu et al., 2024)"
    required_roles = PAPER_ROLES

    def resolve(self, given, *, role=None, alpha=1.0):
        self._require(given)
        derived = {LARGE: 1.0, SMALL_CPT: alpha, SMALL_BASE: -alpha}
        for r, w in derived.items():
            self._agree(r, given[r], w)
        return {r: derived.get(r, 0.0) for r in given}


@register_method
class TriMix(FusionMethod):
    name = "trimix"
    summary = "a * L_large + b * L_small_cpt + (1 - a - b) * L_small_base (small_base derived)"
    required_roles = PAPER_ROLES

    def resolve(self, given, *, role=None, alpha=1.0):
        self._require(given)
        a, b = given[LARGE], given[SMALL_CPT]
        if a is None or b is None:
            raise ValueError(
                "fusion method 'trimix' needs `weight` on the large (a) and small_cpt (b) sources; "
                f"got large={a}, small_cpt={b}. Run `trimix select` to choose them, or set e.g. 0.1 and 0.9."
            )
        base = 1.0 - a - b
        self._agree(SMALL_BASE, given[SMALL_BASE], base)
        return {r: {LARGE: a, SMALL_CPT: b, SMALL_BASE: base}.get(r, 0.0) for r in given}


@register_method
class Entropy(FusionMethod):
    """Per-token weights from each source's confidence at that step.

    At every position ``t`` each source's weight is recomputed from its predictive entropy
    ``H_i(t) = -sum_v p_i(v) log p_i(v)`` (nats):

        w_i(t) = g_i * exp(-H_i(t) / tau) / sum_j g_j * exp(-H_j(t) / tau),   L(t) = sum_i w_i(t) L_i(t)

    with ``g_i >= 0`` the weights the user writes (priors; a source without one gets 1) and ``tau = 1``
    nat. A source that is sure of the next token (low entropy) takes a larger share; the weights are
    non-negative and sum to 1 at every step. Not linear: scored by fusing the full logits, and the weight
    search does not apply.
    """

    name = "entropy"
    summary = "weights recomputed per token: prior g_i times exp(-entropy_i), normalised over sources"
    linear = False
    temperature: ClassVar[float] = 1.0

    def resolve(self, given, *, role=None, alpha=1.0):
        priors = {r: 1.0 if w is None else float(w) for r, w in given.items()}
        negative = {r: w for r, w in priors.items() if w < 0}
        if negative:
            raise ValueError(
                f"fusion method 'entropy' takes non-negative prior weights; got {negative}. "
                "Set them to 0 or more (0 leaves a source out)."
            )
        if not any(priors.values()):
            raise ValueError("fusion method 'entropy' needs a positive prior weight on at least one source")
        return priors

    def combine(self, logits, weights, vocab):
        extra = (1,) * (logits[0].dim() - 2)  # positions between the batch and the vocabulary
        values = [x[..., :vocab].float() for x in logits]
        entropies = torch.stack([_entropy(v) for v in values], dim=-1)  # (B, ..., N)
        priors = weights.view(weights.shape[0], *extra, weights.shape[1])
        share = priors * torch.exp(-(entropies - entropies.amin(-1, keepdim=True)) / self.temperature)
        share = share / share.sum(-1, keepdim=True)
        fused = values[0] * share[..., :1]
        for i, source in enumerate(values[1:], start=1):
            fused += source * share[..., i : i + 1]
        return fused


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy (nats) of ``softmax(logits)`` over the last dimension."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)
