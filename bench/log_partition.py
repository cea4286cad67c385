"""The weight search's inner loop on its own: every candidate's log-partition over the vocabulary.

Side by side on the same logits: trimix's factorised computation (``combination_nll``) vs fusing and
log-sum-exp-ing one candidate at a time, the direct way. Logits are synthetic (no model needed) with
a Gemma-sized vocabulary by default; the cost does not depend on their values.

    python bench/log_partition.py                   # V = 262,144, 36 candidates (the paper's grid)
    python bench/log_partition.py --combos 400      # a 20 x 20 grid
"""

from __future__ import annotations

import argparse

import torch
from common import FINE_GRID, best_time, machine, save, weight_matrix

from trimix.config import SearchConfig
from trimix.fusion import fuse_logits
from trimix.search import combination_nll


def direct_nll(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    out = torch.empty(weights.shape[0], dtype=torch.float64)
    for c in range(weights.shape[0]):
        logp = torch.log_softmax(fuse_logits(logits, weights[c]), dim=-1)
        out[c] = -logp.gather(-1, targets[:, None]).double().sum()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--positions", type=int, default=32)
    parser.add_argument("--combos", type=int, choices=[36, 400], default=36)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, args.positions, args.vocab, generator=generator) * 3
    targets = torch.randint(0, args.vocab, (args.positions,), generator=generator)
    roles = ["large", "small_cpt", "small_base"]
    weights = weight_matrix(SearchConfig() if args.combos == 36 else FINE_GRID, roles)
    factorised = combination_nll(logits, targets, weights)
    direct = direct_nll(logits, targets, weights)
    worst = float(((factorised - direct).abs() / direct.abs()).max())

    t_factorised = best_time(lambda: combination_nll(logits, targets, weights), args.repeats, reduce=min)
    t_direct = best_time(lambda: direct_nll(logits, targets, weights), args.repeats, reduce=min)
    per_token = 1e3 / args.positions
    print(
        f"# log-partition of {len(weights)} candidates, V = {args.vocab:,}, {args.positions} positions — {machine()}"
    )
    print(f"factorised (trimix)      {t_factorised * per_token:7.2f} ms/token")
    print(
        f"direct, one at a time    {t_direct * per_token:7.2f} ms/token   speedup {t_direct / t_factorised:.1f}x"
    )
    print(f"largest relative difference in the NLL sums: {worst:.1e}")
    save(
        args.json,
        {
            "machine": machine(),
            "vocab": args.vocab,
            "candidates": len(weights),
            "factorised_ms_per_token": t_factorised * per_token,
            "direct_ms_per_token": t_direct * per_token,
            "max_relative_difference": worst,
        },
    )


if __name__ == "__main__":
    main()
