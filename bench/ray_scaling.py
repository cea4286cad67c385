"""The Ray executor's cost per cell against the local executor, and items/s with 1 vs 2 workers.

Every run is a real ``trimix eval`` (an :class:`~trimix.evaluation.Evaluator` from construction, which
loads the sources or starts the Ray workers, to close) in a fresh folder, on SIB-200 topic
classification scored by log-likelihood (the paper's weights 0.1/0.9), one cell per language.

* Overhead: the local executor and a 1-worker Ray pool, both with the same torch threads, each timed
  on ``--cells A B`` cells. The fixed cost (start-up, loading) cancels in the slope
  ``(wall(B) - wall(A)) / (B - A)``, the time one more cell adds; the Ray overhead per cell is the
  difference of the two slopes, also given as a share of the local slope.
* Scaling: items/s over B cells for local (1 and all threads), Ray 1 worker x all threads and Ray 2
  workers x 1 thread each; the threads are stated because this machine has 2 cores.

    python bench/ray_scaling.py --model tiny
    python bench/ray_scaling.py --model gemma --items 50 --cells 1 3
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import demo_config, machine, save

from trimix.config import load_config
from trimix.data import sib200_languages
from trimix.evaluation import Evaluator

logger = logging.getLogger("bench")


def eval_config(base: dict, cells: int, items: int, executor: dict) -> dict:
    langs = sib200_languages()[:cells]
    return {
        **base,
        "eval": {
            "methods": [{"name": "trimix", "method": "trimix", "weights": {"large": 0.1, "small_cpt": 0.9}}],
            "tasks": [
                {
                    "task": "sib200_topic",
                    "langs": langs,
                    "limit": items,
                    "shots": 0,
                    "scoring": "loglikelihood",
                }
            ],
            "batch_size": 8,
            "executor": executor,
        },
    }


def timed_eval(raw: dict, kind: str, threads: int) -> float:
    """Wall seconds of one evaluation, construction (loading / starting workers) to close."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="trimix-ray-bench-") as folder:
        start = time.perf_counter()
        evaluator = Evaluator(load_config(raw), Path(folder) / "run", progress=False, executor=kind)
        try:
            evaluator.run()
        finally:
            evaluator.close()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "gemma"], default="tiny")
    parser.add_argument("--cells", type=int, nargs=2, default=[2, 6], metavar=("A", "B"))
    parser.add_argument("--items", type=int, default=20, help="items per cell")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    cores = os.cpu_count() or 1
    small, big = args.cells
    if not 0 < small < big <= len(sib200_languages()):
        raise SystemExit(f"--cells needs 0 < A < B <= {len(sib200_languages())}")
    base = demo_config(args.model)
    local = {"kind": "local"}
    one_worker = {"kind": "ray", "workers": 1, "threads_per_worker": cores, "cpus_per_worker": cores}
    two_workers = {"kind": "ray", "workers": 2, "threads_per_worker": 1, "cpus_per_worker": 1}

    def run(executor: dict, cells: int, threads: int) -> float:
        raw = eval_config(base, cells, args.items, executor)
        seconds = timed_eval(raw, executor["kind"], threads)
        print(
            f"  {executor['kind']:<5} {executor.get('workers', '-')} worker(s), {threads} thread(s) each, "
            f"{cells} cells x {args.items} items: {seconds:.1f} s",
            flush=True,
        )
        return seconds

    print(
        f"# Ray vs local executor, {args.model} trio, {args.items} items per cell — {machine()}, {cores} cores"
    )
    walls = {
        ("local", small): run(local, small, cores),
        ("ray", small): run(one_worker, small, cores),
        ("local", big): run(local, big, cores),
        ("ray", big): run(one_worker, big, cores),
    }
    slope = {k: (walls[(k, big)] - walls[(k, small)]) / (big - small) for k in ("local", "ray")}
    fixed = {k: walls[(k, small)] - small * slope[k] for k in ("local", "ray")}
    overhead = slope["ray"] - slope["local"]
    print(
        f"seconds per cell: local {slope['local']:.2f}, Ray (1 worker) {slope['ray']:.2f}; "
        f"Ray overhead {overhead:+.2f} s per cell ({100 * overhead / slope['local']:+.1f}% of a local cell); "
        f"fixed cost: local {fixed['local']:.1f} s, Ray {fixed['ray']:.1f} s"
    )
    items = big * args.items
    scaling = {
        "local, 1 thread": items / run(local, big, 1),
        f"local, {cores} threads": items / walls[("local", big)],
        f"Ray 1 worker x {cores} threads": items / walls[("ray", big)],
        "Ray 2 workers x 1 thread": items / run(two_workers, big, 1),
    }
    print(f"items/s over {big} cells ({items} items, start-up included):")
    for name, rate in scaling.items():
        print(f"  {name:<28} {rate:6.2f}")
    save(
        args.json,
        {
            "model": args.model,
            "machine": machine(),
            "items_per_cell": args.items,
            "cells": [small, big],
            "walls": {f"{k}_{c}": v for (k, c), v in walls.items()},
            "seconds_per_cell": slope,
            "fixed_seconds": fixed,
            "overhead_per_cell_s": overhead,
            "overhead_share": overhead / slope["local"],
            "items_per_s": scaling,
        },
    )


if __name__ == "__main__":
    main()
