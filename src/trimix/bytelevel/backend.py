"""A token-level source seen one byte at a time: a :class:`~trimix.backends.base.SourceBackend` over
the 258 byte-level symbols (:mod:`trimix.bytelevel.tokenizer`) that drives its inner backend.

Each row of a state keeps a covering tree (:mod:`trimix.bytelevel.marginal`); every tree node that
may still be extended holds one row of the inner backend's state (its KV cache). Reading a byte
runs the inner model only where a token boundary is crossed: the new nodes of every row of the
batch are forwarded together, each continuing its parent's cache (rows are copied with the core's
``keep_rows``, so any backend whose ``keep_rows`` accepts repeated rows can be the inner one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from trimix.backends.base import HIDDEN, DecodeState, SourceBackend, has_capability
from trimix.bytelevel.marginal import BYTE_VOCAB, END, Expansion, Node, NodeDistribution, RowTree
from trimix.bytelevel.spelling import SpellingTable
from trimix.bytelevel.tokenizer import START, ByteTokenizer
from trimix.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass
class ByteState:
    """A batch of byte-level rows: one covering tree each, and the inner state holding their nodes."""

    trees: list[RowTree]
    inner: DecodeState
    next_position: torch.Tensor

    @property
    def batch_size(self) -> int:
        return len(self.trees)

    @property
    def pruned(self) -> list[float]:
        """Each row's share of probability dropped by pruning so far."""
        return [t.pruned for t in self.trees]


class ByteLevelBackend:
    """``inner`` (any core backend with its own tokenizer) as a source of next-byte distributions.

    Args:
        inner: the token-level backend.
        prune: drop tokenizations whose share of the text's probability falls below this (0: exact).
        max_nodes: keep at most this many tokenizations per row (None: no cap).
    """

    capabilities = frozenset()

    def __init__(self, inner: SourceBackend, prune: float = 0.0, max_nodes: int | None = None) -> None:
        self.inner = inner
        self.prune = prune
        self.max_nodes = max_nodes
        self.tokenizer = ByteTokenizer(inner.tokenizer)
        self.table = SpellingTable.build(inner.tokenizer, list(inner.eos_token_ids))
        self.forwards = 0  # inner forward calls, for reports
        self.forwarded_rows = 0
        self.resyncs = 0  # bytes read that no kept tokenization spelled (see _resynchronise)
        self.pruning = prune > 0 or max_nodes is not None
        self.floor = max(prune, 1e-6) if self.pruning else 0.0

    # ---------------------------------------------------------------- properties
    @property
    def model(self) -> Any:
        """The inner model (training and reports read it)."""
        return self.inner.model

    @property
    def logit_rows(self) -> int:
        return BYTE_VOCAB

    @property
    def max_positions(self) -> int | None:
        return None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def eos_token_ids(self) -> list[int]:
        return [END]

    @property
    def num_parameters(self) -> int:
        return self.inner.num_parameters

    # ---------------------------------------------------------------- the core
    @torch.inference_mode()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, ByteState]:
        rows = [
            self._inner_prompt(ids[mask.bool()].tolist())
            for ids, mask in zip(input_ids, attention_mask, strict=True)
        ]
        width = max(len(r) for r in rows)
        pad = self.inner.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        logits, inner = self.inner.prefill(ids.to(self.inner.device), mask.to(self.inner.device))
        self._count(len(rows))
        trees = [
            RowTree(
                self.table,
                [Node(0, 1.0, NodeDistribution.from_logits(logits[b].cpu(), self.table), b)],
                prompt=rows[b],
                floor=self.floor,
            )
            for b in range(len(rows))
        ]
        state = ByteState(trees, inner, attention_mask.sum(-1).cpu())
        return torch.stack([t.next_byte_logprobs() for t in trees]).float(), state

    @torch.inference_mode()
    def advance(
        self, state: ByteState, tokens: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        tokens = tokens.cpu()
        valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid.cpu().bool()
        out = torch.zeros(tokens.shape[0], tokens.shape[1], BYTE_VOCAB)
        for j in range(tokens.shape[1]):
            expansions: list[tuple[RowTree, Expansion]] = []
            lost = []
            for b, tree in enumerate(state.trees):
                if bool(valid[b, j]):
                    try:
                        new = tree.advance(int(tokens[b, j]), self.prune, self.max_nodes)
                    except ValueError as exc:
                        if not self.pruning:
                            raise DataError(f"byte-level source: row {b}: {exc}") from exc
                        lost.append((tree, int(tokens[b, j])))
                        continue
                    expansions += [(tree, e) for e in new]
            self._expand(state, expansions)
            for tree, byte in lost:
                self._resynchronise(state, tree, byte)
            for b, tree in enumerate(state.trees):
                if bool(valid[b, j]):
                    out[b, j] = tree.next_byte_logprobs().float() if not tree.ended else 0.0
        state.next_position = state.next_position + valid.sum(-1)
        return out

    def crop(self, state: ByteState, lengths: torch.Tensor) -> None:
        if bool((lengths.cpu() != state.next_position).any()):
            raise ConfigError("byte-level fusion cannot roll rows back (speculative fusion works on tokens)")

    def keep_rows(self, state: ByteState, rows: torch.Tensor) -> None:
        order = rows.tolist()
        if len(set(order)) != len(order):
            raise ValueError("byte-level states cannot repeat rows")
        state.trees = [state.trees[r] for r in order]
        state.next_position = state.next_position[rows.cpu()]
        self._reindex(state, [])

    def insert_rows(self, state: ByteState, new: ByteState) -> None:
        offset = state.inner.batch_size
        for tree in new.trees:
            for node in tree.nodes:
                node.row += offset
        self.inner.insert_rows(state.inner, new.inner)
        state.trees += new.trees
        state.next_position = torch.cat([state.next_position, new.next_position])

    def compact(self, state: ByteState) -> None:
        self.inner.compact(state.inner)

    # ---------------------------------------------------------------- internals
    def _inner_prompt(self, ids: list[int]) -> list[int]:
        special = bool(ids) and ids[0] == START
        body = bytes(i for i in ids[int(special) :] if i < 256)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"a byte-level prompt is not valid UTF-8 ({exc})") from exc
        from trimix.decoding.text import prefix_token  # here: trimix.decoding imports this module

        tokenizer = self.inner.tokenizer
        inner_ids = tokenizer(text, add_special_tokens=special)["input_ids"] if text or special else []
        return inner_ids or [prefix_token(tokenizer)]

    def _expand(self, state: ByteState, expansions: list[tuple[RowTree, Expansion]]) -> None:
        """Forward the new nodes, each continuing its parent's cache, and keep only live nodes' rows.

        With an inner backend that can ``take`` rows into a state of their own (transformers), only the
        new nodes run; otherwise every row of the inner state is fed, the others marked invalid."""
        if not expansions:
            self._reindex(state, [])
            return
        parents = torch.tensor([e.parent.row for _, e in expansions], device=self.inner.device)
        tokens = torch.tensor([[e.token] for _, e in expansions], device=self.inner.device)
        if callable(getattr(self.inner, "take", None)):
            fresh = self.inner.take(state.inner, parents)
            self._reindex(state, [])
            logits = self._fed_logits(fresh, tokens, None, torch.arange(len(expansions)))
            first = state.inner.batch_size
            if first:
                self.inner.insert_rows(state.inner, fresh)
            else:
                state.inner = fresh
            children = list(range(first, first + len(expansions)))
        else:
            children = self._reindex(state, parents.tolist())
            batch = state.inner.batch_size
            feed = torch.zeros(batch, 1, dtype=torch.long, device=self.inner.device)
            valid = torch.zeros(batch, 1, dtype=torch.bool, device=self.inner.device)
            rows = torch.tensor(children, device=self.inner.device)
            feed[rows], valid[rows] = tokens, True
            logits = self._fed_logits(state.inner, feed, valid, rows)
        self._count(len(expansions))
        for i, (tree, e) in enumerate(expansions):
            dist = NodeDistribution.from_logits(logits[i], self.table)
            tree.nodes.append(Node(len(tree.text), e.weight, dist, children[i]))

    def _fed_logits(
        self, inner: DecodeState, feed: torch.Tensor, valid: torch.Tensor | None, rows: torch.Tensor
    ) -> torch.Tensor:
        """Advance ``inner`` by one token per row and return the logits of ``rows`` (on the CPU); the
        output head runs on those rows only where the backend has it apart."""
        if has_capability(self.inner, HIDDEN):
            hidden = self.inner.advance(inner, feed, valid, hidden=True)
            return self.inner.head_logits(hidden[rows.to(hidden.device), 0]).cpu()
        return self.inner.advance(inner, feed, valid)[rows.to(feed.device), 0].cpu()

    def _resynchronise(self, state: ByteState, tree: RowTree, byte: int) -> None:
        """Pruning dropped every tokenization that spells ``byte`` next (it had only the floor's
        probability): restart the row from the source's own tokenization of its text so far, its last
        token left open, and read the rest of the text again from there (counted in ``resyncs``)."""
        self.resyncs += 1
        if self.resyncs == 1:
            logger.warning(
                "byte-level source: a byte that no kept tokenization spells was read; resynchronising the "
                "row from its text's own tokenization (lower fusion.byte_prune or raise byte_max_nodes to "
                "make this rarer)"
            )
        text = bytes(tree.text) + bytes([byte])
        whole = text.decode("utf-8", errors="ignore").encode("utf-8")
        whole = whole if text.startswith(whole) else b""
        ids = (
            self.inner.tokenizer(whole.decode("utf-8"), add_special_tokens=False)["input_ids"][:-1]
            if whole
            else []
        )
        spelled = b"".join(self.table.by_id[i] or b"" for i in ids)
        if not text.startswith(spelled):
            ids, spelled = [], b""
        ids_t = torch.tensor([tree.prompt + ids], device=self.inner.device)
        logits, fresh = self.inner.prefill(ids_t, torch.ones_like(ids_t))
        self._count(1)
        self._reindex(state, [])
        row = state.inner.batch_size
        self.inner.insert_rows(state.inner, fresh)
        tree.nodes = [Node(len(spelled), 1.0, NodeDistribution.from_logits(logits[0].cpu(), self.table), row)]
        tree.text = bytearray(spelled)
        for b in text[len(spelled) :]:
            try:  # unpruned: the few bytes after the last boundary, every way of spelling them
                new = tree.advance(b, 0.0, None)
            except ValueError as exc:
                raise DataError(f"byte-level source: {exc}") from exc
            self._expand(state, [(tree, e) for e in new])

    def _reindex(self, state: ByteState, extra: list[int]) -> list[int]:
        """Keep the inner rows of every live node, then append copies of ``extra`` rows; renumber the
        nodes; return the rows the copies took."""
        keep = [node.row for tree in state.trees for node in tree.nodes] + extra
        if keep != list(range(state.inner.batch_size)):
            self.inner.keep_rows(state.inner, torch.tensor(keep, dtype=torch.long, device=self.inner.device))
        row = 0
        for tree in state.trees:
            for node in tree.nodes:
                node.row = row
                row += 1
        return list(range(row, row + len(extra)))

    def _count(self, rows: int) -> None:
        self.forwards += 1
        self.forwarded_rows += rows
