"""A source's exact next-byte distribution, from its next-token distributions (the covering tree).

**Definition.** A source defines a distribution over token sequences after its prompt. Its byte-level
source is the distribution those sequences induce over the bytes they spell: the probability that
the text continues with bytes ``x`` is the total probability of **every** token sequence whose
spelling starts with ``x`` and whose last token is the first to reach ``x``'s end (every covering
tokenization, not only the tokenizer's canonical one). End-of-sequence is a symbol of its own (id
256): ``P(x, end)`` is the probability of the sequences spelling exactly ``x`` and then ending.
Tokens that spell nothing and do not end (special tokens) are excluded, the rest renormalised at
every step. Sampling this byte source byte by byte is sampling the source's tokens (special tokens
excluded) and reading their bytes; the prompt is the source's own tokenization of the prompt text,
as in token-level decoding.

**The tree.** A *node* is a token sequence ``T`` after the prompt whose spelling is a prefix of the
text so far ``x``; its weight is ``P(T)``, its distribution ``p(. | T)`` comes from one forward pass
when its spelling first reaches the end of ``x`` (a token boundary is crossed). With ``u`` the bytes
of ``x`` after ``T``'s spelling, ``P(x b) = sum_T P(T) * sum_{t: spelling(t) starts with u b} p(t | T)``:
a prefix range of the tokens sorted by spelling (:class:`~trimix.bytelevel.spelling.SpellingTable`).
Weights are kept relative to ``P(x)`` (they sum, with each node's pending mass, to 1).

**Pruning** (``prune``, ``max_nodes``): a node whose share of ``P(x)`` falls below ``prune``, or
beyond the ``max_nodes`` largest, is dropped and the rest renormalised; the dropped share is
counted (:attr:`RowTree.pruned`). ``prune=0`` and no cap is the exact definition above; the tests
check it against brute-force enumeration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from trimix.bytelevel.spelling import SpellingTable

END = 256  # the end-of-sequence symbol at the byte level
BYTE_VOCAB = 258  # 256 bytes, END, and a start marker (never predicted)


@dataclass
class NodeDistribution:
    """``p(. | T)`` over the sorted byte-bearing tokens (float64, special tokens excluded, renormalised)."""

    cumulative: torch.Tensor  # (N + 1,) running sums in spelling order, starting at 0
    sorted_probs: torch.Tensor  # (N,)
    end: float  # p(end | T)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, table: SpellingTable) -> NodeDistribution:
        """From one position's logits ``(R,)`` (R >= the tokenizer's length; padded rows ignored)."""
        probs = torch.softmax(logits[: table.vocab].double(), dim=-1)
        bearing = probs[table.order]
        end = float(probs[table.eos_ids].sum()) if table.eos_ids else 0.0
        total = float(bearing.sum()) + end
        if not total > 0:
            raise ValueError("the source gives every byte-bearing token and end-of-sequence probability 0")
        bearing = bearing / total
        cumulative = torch.zeros(bearing.numel() + 1, dtype=torch.float64)
        torch.cumsum(bearing, 0, out=cumulative[1:])
        return cls(cumulative, bearing, end / total)

    def range_mass(self, lo: int, hi: int) -> float:
        return float(self.cumulative[hi] - self.cumulative[lo])


@dataclass
class Node:
    """One tokenization of a prefix of the text: its spelling's length, weight and distribution."""

    consumed: int  # bytes of the text its tokens spell
    weight: float  # P(T) / P(x)
    dist: NodeDistribution
    row: int  # its row in the inner backend's state


@dataclass
class Expansion:
    """A node to create: ``parent``'s tokens plus ``token`` (needs one forward from the parent's row)."""

    parent: Node
    token: int
    weight: float


@dataclass
class RowTree:
    """One sequence's covering tree over one source."""

    table: SpellingTable
    nodes: list[Node]
    text: bytearray = field(default_factory=bytearray)
    log_prob: float = 0.0  # log P(x) under the (pruned) tree
    pruned: float = 0.0  # total share of P dropped by pruning, summed over steps
    ended: bool = False
    prompt: list[int] = field(default_factory=list)  # the inner prompt ids (to resynchronise from)
    floor: float = 0.0  # probability spread over every symbol when pruning (see ``next_byte_logprobs``)

    def next_byte_logprobs(self) -> torch.Tensor:
        """``(258,)`` float64 log-probabilities of each next byte and END (-inf: impossible; the start
        marker is never predicted). With a ``floor`` (pruning on), that much probability is spread over
        the 257 symbols, so a byte only a dropped tokenization could spell stays possible."""
        mass = torch.zeros(BYTE_VOCAB, dtype=torch.float64)
        bounds = self.table.first_bounds
        for node in self.nodes:
            pending = bytes(self.text[node.consumed :])
            if not pending:
                cum = node.dist.cumulative
                mass[:256] += node.weight * (cum[bounds[1:]] - cum[bounds[:-1]])
                mass[END] += node.weight * node.dist.end
                continue
            lo, hi = self.table.prefix_range(pending)
            if len(pending) >= self.table.next_byte.shape[1]:
                continue  # no token is longer than what is pending
            following = self.table.next_byte[lo:hi, len(pending)].long()
            keep = following >= 0
            mass[:256] += node.weight * torch.bincount(
                following[keep], weights=node.dist.sorted_probs[lo:hi][keep], minlength=256
            )
        total = float(mass.sum())
        if not total > 0:
            raise ValueError("no tokenization of the source continues this text")
        mass = mass / total
        if self.floor > 0:
            mass[: END + 1] = (1 - self.floor) * mass[: END + 1] + self.floor / (END + 1)
        return mass.log()

    def advance(self, byte: int, prune: float, max_nodes: int | None) -> list[Expansion]:
        """Append ``byte``: drop nodes it rules out, reweight, prune, and return the new nodes whose
        last token ends exactly here (each needs a forward before the next byte is read).

        Raises:
            ValueError: when no tokenization of the source spells the text with ``byte`` appended.
        """
        if self.ended:
            return []
        if byte >= 256:
            self.ended, self.nodes = True, []  # nothing follows the end: release its rows
            return []
        self.text.append(byte)
        kept: list[tuple[Node, float]] = []  # (node, its pending share)
        children: list[Expansion] = []
        for node in self.nodes:
            pending = bytes(self.text[node.consumed :])
            lo, hi = self.table.prefix_range(pending)
            if lo == hi:
                continue
            exact = self.table.exact(pending, lo, hi)
            for pos in exact:
                weight = node.weight * float(node.dist.sorted_probs[pos])
                if weight > 0:
                    children.append(Expansion(node, int(self.table.order[pos]), weight))
            rest = node.weight * node.dist.range_mass(lo + len(exact), hi)
            if rest > 0:
                kept.append((node, rest))
        total = sum(share for _, share in kept) + sum(c.weight for c in children)
        if not total > 0:
            self.text.pop()
            raise ValueError(f"no tokenization of the source spells the text followed by byte {byte}")
        self.log_prob += math.log(total)
        shares = [share / total for _, share in kept] + [c.weight / total for c in children]
        keep = self._survivors(shares, prune, max_nodes)
        survivors = sum(shares[i] for i in keep)
        self.pruned += 1.0 - survivors
        if survivors < 1.0:
            self.log_prob += math.log(survivors)
        scale = 1.0 / (total * survivors)
        self.nodes = []
        for i in keep:
            if i < len(kept):
                node = kept[i][0]
                node.weight *= scale
                self.nodes.append(node)
        new = [children[i - len(kept)] for i in keep if i >= len(kept)]
        for child in new:
            child.weight *= scale
        return new

    @staticmethod
    def _survivors(shares: list[float], prune: float, max_nodes: int | None) -> list[int]:
        """Indices kept: shares at least ``prune`` (the largest always), at most ``max_nodes`` of them."""
        ranked = sorted(range(len(shares)), key=lambda i: -shares[i])
        keep = [i for i in ranked if shares[i] >= prune] or ranked[:1]
        if max_nodes is not None:
            keep = keep[:max_nodes]
        return sorted(keep)
