"""The Ray executor's cost per cell against the local executor, and items/s with 1 vs 2 workers.

Every run is an evaluation (:class:`~trimix.evaluation.Evaluator`, as ``trimix eval`` runs it) in a
fresh process and folder, timed from the moment the sources are loaded (locally, or in every Ray
worker) to the end of ``run()`` (report included), on SIB-200 topic classification scored by log-likelihood (the paper's weights 0.1/0.9), one cell per language.

* Overhead: the local executor and a 1-worker Ray pool, both with the same torch threads, each timed
  on ``--cells A B`` cells; the slope ``(time(B) - time(A)) / (B - A)`` is what one more cell costs
  (a per-run cost, e.g. the report, cancels). The Ray overhead per cell is the difference of the
  slopes, also given as a share of the local slope.
* Scaling: items/s from the same slopes for local, Ray 1 worker x all threads and Ray 2 workers x 1
  thread each; the threads are stated because this machine has 2 cores.

    python bench/ray_scaling.py --model tiny
    python bench/ray_scaling.py --model gemma --items 50 --cells 1 3 --repeats 1
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import demo_config, machine, save

from trimix.data import sib200_languages

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
    """Seconds of one evaluation's ``run()`` in a fresh process, after the sources are loaded (locally,
    or in every Ray worker): start-up is left out, and no run inherits another's warm caches."""
    with tempfile.TemporaryDirectory(prefix="trimix-ray-bench-") as folder:
        config = Path(folder) / "run.yaml"
        config.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
        command = [sys.executable, __file__, "--child", str(config), kind]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        return float(done.stdout.strip().splitlines()[-1])


def child(config_path: str, kind: str) -> None:
    """Load, wait until every worker holds the sources, then time ``run()``; print the seconds."""
    from trimix.config import load_config
    from trimix.evaluation import Evaluator

    config = load_config(config_path)
    evaluator = Evaluator(config, Path(config_path).parent / "run", progress=False, executor=kind)
    try:
        if kind == "ray":
            import ray

            ray.get([actor.ping.remote() for actor in evaluator.executor.actors])
        start = time.perf_counter()
        evaluator.run()
        print(time.perf_counter() - start)
    finally:
        evaluator.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "gemma"], default="tiny")
    parser.add_argument("--cells", type=int, nargs=2, default=[2, 6], metavar=("A", "B"))
    parser.add_argument("--items", type=int, default=20, help="items per cell")
    parser.add_argument("--repeats", type=int, default=3, help="runs per point; the fastest counts")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "EXECUTOR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
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
        seconds = min(timed_eval(raw, executor["kind"], threads) for _ in range(args.repeats))
        print(
            f"  {executor['kind']:<5} {executor.get('workers', '-')} worker(s), {threads} thread(s) each, "
            f"{cells} cells x {args.items} items: {seconds:.1f} s",
            flush=True,
        )
        return seconds

    print(
        f"# Ray vs local executor, {args.model} trio, {args.items} items per cell — {machine()}, {cores} cores"
    )
    run(local, 1, cores)  # warm-up (imports, first-call costs), not counted
    setups = {
        f"local, {cores} threads": (local, cores),
        f"Ray 1 worker x {cores} threads": (one_worker, cores),
        "Ray 2 workers x 1 thread": (two_workers, 1),
    }
    walls = {
        (name, cells): run(ex, cells, threads)
        for name, (ex, threads) in setups.items()
        for cells in (small, big)
    }
    slope = {name: (walls[(name, big)] - walls[(name, small)]) / (big - small) for name in setups}
    fixed = {name: walls[(name, small)] - small * slope[name] for name in setups}
    local_name, ray_name = list(setups)[:2]
    overhead = slope[ray_name] - slope[local_name]
    print(
        f"seconds per cell: local {slope[local_name]:.2f}, Ray (1 worker, same threads) {slope[ray_name]:.2f}; "
        f"Ray overhead {overhead:+.2f} s per cell ({100 * overhead / slope[local_name]:+.1f}% of a local cell)"
    )
    print(f"items/s ({args.items} items per cell) = items per cell / seconds per cell; per run: the rest")
    rates = {}
    for name in setups:
        rates[name] = args.items / slope[name]
        print(f"  {name:<28} {rates[name]:7.2f} items/s   per run {fixed[name]:5.1f} s")
    save(
        args.json,
        {
            "model": args.model,
            "machine": machine(),
            "items_per_cell": args.items,
            "cells": [small, big],
            "walls": {f"{k} | {c} cells": v for (k, c), v in walls.items()},
            "seconds_per_cell": slope,
            "fixed_seconds": fixed,
            "overhead_per_cell_s": overhead,
            "overhead_share": overhead / slope[local_name],
            "items_per_s": rates,
        },
    )


if __name__ == "__main__":
    main()
