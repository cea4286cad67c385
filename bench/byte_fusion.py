"""Byte-level fusion on the embedded default: a vocabulary-extended Uyghur CPT model fused with sources
that keep Gemma's tokenizer, against the demo's shared-tokenizer TriMix.

Measured side by side in one run, on the CPT corpus's held-out Uyghur lines (the demo's held-out text):

* tokens per byte of Gemma's tokenizer and of the extended one;
* held-out **bits per byte** with 95% bootstrap intervals, and paired differences, of:
  the demo's CPT model alone and TriMix at the token level (shared tokenizer); TriMix at the byte
  level on the same shared-tokenizer models (what marginalising over tokenizations changes); the
  extended CPT model alone (its own tokens, and at the byte level) and byte-level TriMix with it as
  ``small_cpt`` next to the demo's ``large`` and Gemma as ``small_base``;
* decoding speed in bytes/s of byte-level vs token-level fusion on the same models, batch 1 and 8.

The extended model is trained once and cached (``trimix cpt --extend-vocab N`` with the demo's CPT
recipe and token budget unless ``--cpt-steps`` says more).

    python bench/byte_fusion.py                       # +8,000 tokens, the demo's 24 CPT steps
    python bench/byte_fusion.py --extend 16000 --cpt-steps 96 --texts 40
    python bench/byte_fusion.py --skip-quality --prune 1e-2 --max-nodes 2   # speed at coarser pruning
    python bench/byte_fusion.py --prune-sweep 12                             # accuracy of the pruning
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from common import demo_paths, machine, prompts, save

from trimix import FusedLM
from trimix.backends import load_source
from trimix.backends.loading import Source, resolve_cache_dir
from trimix.config import FusionConfig, SourceConfig
from trimix.data import UYGHUR_CORPUS
from trimix.decoding import SourcePool
from trimix.demo import BASE_MODEL, VALIDATION_LINES, _lora_recipe
from trimix.fusion import Fusion
from trimix.metrics.bootstrap import bits_per_byte_stats, bootstrap, paired_bootstrap
from trimix.training import run_cpt, split_corpus
from trimix.training.vocab import tokens_per_byte

logger = logging.getLogger("byte_fusion")


def extended_model(count: int, steps: int) -> tuple[str, dict]:
    """The demo's Uyghur CPT recipe with ``count`` new tokens; trained once, then reused."""
    folder = resolve_cache_dir(None) / "bench" / f"cpt-uig-ext{count}-s{steps}"
    recipe = _lora_recipe(
        UYGHUR_CORPUS,
        steps,
        max_validation_lines=VALIDATION_LINES,
        max_forgetting_lines=40,
        extend_vocab=count,
    )
    report_path = folder / "cpt_report.json"
    if not (report_path.is_file() and "vocabulary" in report_path.read_text()):
        run_cpt(SourceConfig(model=BASE_MODEL, role="small_base"), recipe, folder, progress=True)
    return str(folder / "merged"), json.loads(report_path.read_text())


def heldout_texts(limit: int) -> list[str]:
    recipe = _lora_recipe(UYGHUR_CORPUS, 1, max_validation_lines=VALIDATION_LINES)
    split = split_corpus(
        recipe.corpus,
        recipe.text_field,
        recipe.dedup,
        recipe.seed,
        recipe.validation_fraction,
        VALIDATION_LINES,
    )
    return split.validation[:limit]


def pool(sources: list[Source], space: str, prune: float, max_nodes: int | None) -> SourcePool:
    return SourcePool(sources, space=space, byte_prune=prune, byte_max_nodes=max_nodes)


def trimix(a: float, b: float) -> Fusion:
    return Fusion.resolve("trimix", {"large": a, "small_cpt": b, "small_base": None})


def single(role: str) -> Fusion:
    return Fusion({role: 1.0}, "single", options={"role": role})


def score(name: str, lm: FusedLM, fusion: Fusion, texts: list[str]) -> dict:
    """Per-text NLL (nats) and bytes under one fusion, and the wall time."""
    start = time.perf_counter()
    (rows,) = lm.with_fusion(fusion).loglikelihood_rolling_by_fusion(texts, [fusion], progress=True)
    seconds = time.perf_counter() - start
    nll = [-r.logprob for r in rows]
    n_bytes = [len(t.encode("utf-8")) for t in texts]
    interval = bootstrap(bits_per_byte_stats(nll, n_bytes))
    logger.info("%-34s %.4f bits/byte %s (%.0f s)", name, interval.value, interval.format(4), seconds)
    return {
        "name": name,
        "nll": nll,
        "n_bytes": n_bytes,
        "bits_per_byte": interval.to_dict(),
        "seconds": seconds,
    }


def bytes_per_second(lm: FusedLM, batch: list[str], new: int) -> tuple[float, int]:
    """Greedy decoding: output bytes per second (one warm-up run first) and the bytes made."""
    lm.generate(batch[:1], max_new_tokens=2)
    start = time.perf_counter()
    out = lm.generate(batch, max_new_tokens=new)
    seconds = time.perf_counter() - start
    made = sum(len(o.text.encode("utf-8")) for o in out)
    return made / seconds, made


def prune_sweep(texts: list[str], settings: list[tuple[float, int]]) -> list[dict]:
    """The demo CPT model alone on ``texts``: bits per byte of its own tokens, and at the byte level
    under each (byte_prune, byte_max_nodes), with the inner forwards each needed."""
    cpt = load_source(SourceConfig(model=demo_paths("gemma")["small_cpt"], role="small_cpt", weight=1.0))
    rows = [score("tokens", FusedLM([cpt]), single("small_cpt"), texts)]
    for prune, nodes in settings:
        lm = FusedLM(pool([cpt], "bytes", prune, nodes), single("small_cpt"))
        row = score(f"bytes prune={prune} nodes={nodes}", lm, single("small_cpt"), texts)
        backend = lm.sources[0].backend
        row.update(forwards=backend.forwards, rows=backend.forwarded_rows, resyncs=backend.resyncs)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extend", type=int, default=8000, help="new tokens for the extended CPT model")
    p.add_argument("--cpt-steps", type=int, default=24, help="CPT steps (the demo's: 24 x 4 x 128 tokens)")
    p.add_argument("--texts", type=int, default=40, help="held-out lines scored")
    p.add_argument(
        "--weights", type=float, nargs=2, default=(0.1, 1.0), help="TriMix a (large), b (small_cpt)"
    )
    p.add_argument("--prune", type=float, default=FusionConfig().byte_prune)
    p.add_argument("--max-nodes", type=int, default=FusionConfig().byte_max_nodes)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=16, help="token-level decoding length")
    p.add_argument("--new-bytes", type=int, default=48, help="byte-level decoding length")
    p.add_argument("--skip-quality", action="store_true", help="decoding speed only")
    p.add_argument("--json", help="also write the results here")
    p.add_argument(
        "--prune-sweep",
        type=int,
        metavar="LINES",
        help="only: the demo CPT model on LINES held-out lines under several pruning settings",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)

    if args.prune_sweep:
        settings = [(1e-2, 1), (1e-2, 2), (1e-3, 4), (1e-4, 8), (1e-6, 32)]
        save(
            args.json,
            {"machine": machine(), "prune_sweep": prune_sweep(heldout_texts(args.prune_sweep), settings)},
        )
        return
    paths = demo_paths("gemma")
    ext_path, ext_report = extended_model(args.extend, args.cpt_steps)
    loaded = {
        role: load_source(SourceConfig(model=path, role=role, weight=1.0)) for role, path in paths.items()
    }
    ext = load_source(SourceConfig(model=ext_path, role="small_cpt", weight=1.0))
    shared = [loaded["large"], loaded["small_cpt"], loaded["small_base"]]
    mixed = [loaded["large"], ext, loaded["small_base"]]
    texts = heldout_texts(args.texts)
    a, b = args.weights
    result: dict = {
        "machine": machine(),
        "settings": vars(args),
        "extended_cpt": {
            k: ext_report.get(k)
            for k in (
                "vocabulary",
                "bits_per_byte_before",
                "bits_per_byte_after",
                "steps",
                "tokens_seen",
                "wall_seconds",
            )
        },
        "tokens_per_byte": {
            "gemma": tokens_per_byte(loaded["small_base"].tokenizer, texts),
            "extended": tokens_per_byte(ext.tokenizer, texts),
        },
    }
    tpb = result["tokens_per_byte"]
    tpb["reduction"] = 1 - tpb["extended"] / tpb["gemma"]
    logger.info(
        "tokens per byte on %d held-out lines: gemma %.4f, extended %.4f (%.1f%% fewer)",
        len(texts),
        tpb["gemma"],
        tpb["extended"],
        100 * tpb["reduction"],
    )

    tokens_lm = FusedLM(pool(shared, "tokens", args.prune, args.max_nodes), trimix(a, b))
    shared_bytes_lm = FusedLM(pool(shared, "bytes", args.prune, args.max_nodes), trimix(a, b))
    mixed_lm = FusedLM(pool(mixed, "auto", args.prune, args.max_nodes), trimix(a, b))
    ext_tokens_lm = FusedLM([ext])
    assert mixed_lm.pool.space == "bytes"

    if not args.skip_quality:
        rows = [
            score("small_cpt (demo CPT), tokens", tokens_lm, single("small_cpt"), texts),
            score(f"TriMix({a},{b}) tokens, shared", tokens_lm, trimix(a, b), texts),
            score(f"TriMix({a},{b}) bytes, shared", shared_bytes_lm, trimix(a, b), texts),
            score("extended CPT, own tokens", ext_tokens_lm, single("small_cpt"), texts),
            score("extended CPT, bytes", mixed_lm, single("small_cpt"), texts),
            score(f"TriMix({a},{b}) bytes, extended", mixed_lm, trimix(a, b), texts),
        ]
        by_name = {r["name"]: r for r in rows}
        pairs = [
            (f"TriMix({a},{b}) bytes, extended", f"TriMix({a},{b}) tokens, shared"),
            (f"TriMix({a},{b}) bytes, shared", f"TriMix({a},{b}) tokens, shared"),
            ("extended CPT, bytes", "small_cpt (demo CPT), tokens"),
            (f"TriMix({a},{b}) bytes, extended", "extended CPT, bytes"),
        ]
        result["bits_per_byte"] = rows
        result["paired_differences"] = []
        for x, y in pairs:
            diff = paired_bootstrap(
                bits_per_byte_stats(by_name[x]["nll"], by_name[x]["n_bytes"]),
                bits_per_byte_stats(by_name[y]["nll"], by_name[y]["n_bytes"]),
            )
            result["paired_differences"].append({"run": x, "base": y, "difference": diff.to_dict()})
            logger.info("%s minus %s: %s bits/byte", x, y, diff.format(4))

    speed = []
    sentences = prompts(max(args.batch_sizes), max_chars=80)
    for batch_size in args.batch_sizes:
        batch = sentences[:batch_size]
        row = {"batch_size": batch_size}
        row["tokens_shared"], _ = bytes_per_second(tokens_lm, batch, args.new_tokens)
        row["bytes_shared"], _ = bytes_per_second(shared_bytes_lm, batch, args.new_bytes)
        row["bytes_extended"], _ = bytes_per_second(mixed_lm, batch, args.new_bytes)
        row["ratio_shared"] = row["bytes_shared"] / row["tokens_shared"]
        speed.append(row)
        logger.info(
            "batch %d: token-level %.1f B/s; byte-level %.1f B/s (%.2fx); byte-level with the extended model %.1f B/s",
            batch_size,
            row["tokens_shared"],
            row["bytes_shared"],
            row["ratio_shared"],
            row["bytes_extended"],
        )
    result["decoding_bytes_per_second"] = speed
    save(args.json, result)


if __name__ == "__main__":
    main()
