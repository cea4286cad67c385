"""The fused log-likelihood of many weight combinations from the same sources' logits: pure tensor math.

``combination_nll`` is what the weight search and log-likelihood evaluation call; everything else here
is how it avoids fusing each combination over the whole vocabulary.
"""

from __future__ import annotations

import torch

from trimix.fusion.math import fuse_logits

# Table entries (positions x distinct weight values x vocabulary) per piece of the log-partition. On
# CPU a piece is one position for large vocabularies (each pass stays in cache); a GPU wants fewer,
# larger kernels. Either way the tables' memory is bounded whatever the number of combinations.
_TABLE_ENTRIES = {"cpu": 2**19, "cuda": 2**26}


def combination_nll(
    source_logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    groups: torch.Tensor | None = None,
    n_groups: int = 1,
) -> torch.Tensor:
    """Summed negative log-likelihood of ``targets`` under each fused combination.

    ``nll = logsumexp_v(f) - f[target]`` with ``f = fuse_logits(source_logits, w)``. The target term is
    linear and comes straight from :func:`fuse_logits`. The log-sum-exp is factorised instead of
    fusing each combination over the whole vocabulary: when every weight vector sums to 1 (the
    TriMix grid, single sources and Proxy Tuning all do), ``f = L_r + sum_k w_k (L_k - L_r)``, so
    ``exp(f)`` is a product of one table per free source and distinct weight value; with two free
    sources all pairs are one small matrix product. That needs ``sum_k distinct_k`` exponentials per
    vocabulary entry rather than C, and never materialises a ``C x V`` tensor. Factors are shifted by
    their extremes; a combination whose sum could underflow (a shift gap of more than ~46 nats) is
    recomputed directly at the positions concerned.

    Args:
        source_logits: ``(N, T, V)`` raw logits of N sources at T positions.
        targets: ``(T,)`` the token ids that follow each position.
        weights: ``(C, N)`` one weight vector per combination.
        groups: optional ``(T,)`` group index of each position (e.g. template vs the task's own text).
        n_groups: how many groups.

    Returns:
        ``(C,)`` float64 NLL sums (natural log), or ``(n_groups, C)`` sums per group with ``groups``.
    """
    logits = source_logits.float()
    weights = weights.to(device=logits.device, dtype=torch.float32)
    chosen = fuse_logits(
        logits.gather(-1, targets.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1), weights
    )
    log_z = _factorised_log_partition(logits, weights)  # (C, T), NaN where the underflow guard fired
    for c in torch.isnan(log_z).any(dim=-1).nonzero().squeeze(-1).tolist():
        where = torch.isnan(log_z[c]).nonzero().squeeze(-1)
        log_z[c, where] = torch.logsumexp(fuse_logits(logits[:, where], weights[c]), dim=-1).double()
    per_position = log_z - chosen.double()  # (C, T)
    if groups is None:
        return per_position.sum(-1).cpu()
    sums = per_position.new_zeros(n_groups, per_position.shape[0])
    return sums.index_add_(0, groups.to(sums.device), per_position.T).cpu()


def _factorised_log_partition(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``logsumexp_v(sum_n w_cn L_n)`` for every combination c and position t, as ``(C, T)`` float64.

    Works on pieces of positions (on CPU one position at a time for large vocabularies) in buffers
    allocated once, so each pass stays in cache and nothing is allocated per piece: at V = 262k,
    fresh tensors cost more in page faults than the arithmetic. Every table entry costs one
    ``add``/``mul`` and one ``exp``.
    """
    n_sources, n_pos, vocab = logits.shape
    affine = bool(torch.allclose(weights.sum(-1), torch.ones_like(weights[:, 0]), atol=1e-6))
    if affine and n_sources == 1:
        return torch.logsumexp(logits[0], dim=-1).double().expand(weights.shape[0], n_pos).clone()
    ref = n_sources - 1 if affine else n_sources  # affine: the last source rides in the first table
    factors = [torch.unique(weights[:, k], return_inverse=True) for k in range(ref)]
    indices = [inverse for _, inverse in factors]
    scales = [values.tolist() for values, _ in factors]  # host floats: no device sync per piece
    negative = [min(values) < 0 for values in scales]
    budget = _TABLE_ENTRIES.get(logits.device.type, _TABLE_ENTRIES["cuda"])
    step = min(n_pos, max(1, budget // (vocab * sum(map(len, scales)))))
    tables = [logits.new_empty(step, len(values), vocab) for values, _ in factors]
    diff, above, below = logits.new_empty(3, step, vocab)
    base = logits.new_zeros(step, vocab)  # L_ref - max L_ref when affine; stays 0 otherwise
    lows = logits.new_zeros(n_pos, ref + 1)  # per position: min of each factor
    highs = logits.new_zeros(n_pos, ref + 1)  # and max (the last column: the reference's max)
    sums = torch.empty(n_pos, weights.shape[0], dtype=torch.float64, device=logits.device)
    for p0 in range(0, n_pos, step):
        rows = slice(p0, min(p0 + step, n_pos))
        size = rows.stop - p0
        if affine:
            reference = logits[ref, rows]
            top = _row_max(reference)
            highs[rows, ref:] = top
            torch.sub(reference, top, out=base[:size])
        for k in range(len(factors)):
            factor = torch.sub(logits[k, rows], reference, out=diff[:size]) if affine else logits[k, rows]
            low, high = _row_extremes(factor)
            lows[rows, k : k + 1], highs[rows, k : k + 1] = low, high
            # exp(u * (D - max D)) <= 1 for u >= 0, and exp(u * (D - min D)) <= 1 for u < 0.
            torch.sub(factor, high, out=above[:size])
            if negative[k]:
                torch.sub(factor, low, out=below[:size])
            for i, u in enumerate(scales[k]):
                shifted = above[:size] if u >= 0 else below[:size]
                if k == 0:
                    torch.add(base[:size], shifted, alpha=u, out=tables[k][:size, i])
                else:
                    torch.mul(shifted, u, out=tables[k][:size, i])
            tables[k][:size].exp_()
        sums[rows] = _product_sums([table[:size] for table in tables], indices)
    shifts = highs[:, ref:].double().expand_as(sums).clone()  # (T, C)
    for k, (values, inverse) in enumerate(factors):
        peak = torch.where(values >= 0, values * highs[:, k : k + 1], values * lows[:, k : k + 1])  # (T, U)
        shifts += peak[:, inverse].double()
    log_z = (sums.log() + shifts).T  # (C, T)
    # A sum below e-46 may have lost terms under float32's e-87 floor that matter: recompute it exactly.
    return log_z.masked_fill(sums.T < 1e-20, float("nan"))


def _row_max(rows: torch.Tensor) -> torch.Tensor:
    """The max of each row as ``(R, 1)``. A single row uses the whole-tensor reduction, which runs on
    every core; reducing along the last dim of one row runs on one (about 10x slower at V = 262k)."""
    return rows.max().view(1, 1) if rows.shape[0] == 1 else rows.amax(dim=-1, keepdim=True)


def _row_extremes(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of each row as ``(R, 1)`` tensors, with :func:`_row_max`'s single-row rule."""
    if rows.shape[0] == 1:
        smallest, largest = torch.aminmax(rows)
        return smallest.view(1, 1), largest.view(1, 1)
    return torch.aminmax(rows, dim=-1, keepdim=True)


def _product_sums(tables: list[torch.Tensor], indices: list[torch.Tensor]) -> torch.Tensor:
    """``out[t, c] = sum_v prod_k tables[k][t, indices[k][c], v]``, as ``(T, C)`` float64."""
    if len(tables) == 1:
        return tables[0].sum(-1)[:, indices[0]].double()
    if len(tables) == 2:
        return _pairwise_sums(tables[0], tables[1])[:, indices[0], indices[1]].double()
    product = torch.empty_like(tables[0][:, 0])
    out = torch.empty(product.shape[0], indices[0].numel(), dtype=torch.float64, device=product.device)
    for c in range(out.shape[1]):
        torch.mul(tables[0][:, indices[0][c]], tables[1][:, indices[1][c]], out=product)
        for table, index in zip(tables[2:], indices[2:], strict=True):
            product.mul_(table[:, index[c]])
        out[:, c] = product.sum(-1)
    return out


def _pairwise_sums(left: torch.Tensor, right: torch.Tensor, blocks: int = 64) -> torch.Tensor:
    """``out[t, i, j] = sum_v left[t, i, v] * right[t, j, v]``.

    A product with a tiny output and a 262k-long inner dimension runs poorly as one matmul on CPU;
    split into a batch of ``blocks`` shorter products it is several times faster.
    """
    n_pos, u1, vocab = left.shape
    if vocab < 64 * blocks or left.device.type != "cpu":
        return torch.bmm(left, right.transpose(1, 2))
    u2 = right.shape[1]
    main = vocab - vocab % blocks
    out = left.new_empty(n_pos, u1, u2)
    for t in range(n_pos):  # per position the block split is a view; across positions it would copy
        a = left[t, :, :main].view(u1, blocks, -1).transpose(0, 1)  # (blocks, U1, K)
        b = right[t, :, :main].view(u2, blocks, -1).permute(1, 2, 0)  # (blocks, K, U2)
        out[t] = torch.bmm(a, b).sum(0)
        if main < vocab:
            out[t] += left[t, :, main:] @ right[t, :, main:].T
    return out
