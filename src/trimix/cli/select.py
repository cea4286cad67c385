"""``trimix select``: choose fusion weights without labels, by fused perplexity on task prompts."""

from __future__ import annotations

import argparse
import json
import logging

from trimix.cli.common import add_config_args, config_from_args
from trimix.config import MethodSpec, TaskSpec
from trimix.decoding import FusedLM
from trimix.errors import ConfigError
from trimix.evaluation.runner import SELECTIONS
from trimix.io import atomic_write_json
from trimix.runinfo import folder_lock, prepare_output_dir, write_run_info
from trimix.search import build_candidates, search_weights, selection_texts

logger = logging.getLogger(__name__)

EXAMPLE = """example:
  trimix select -c configs/qwen25_uyghur.yaml --task sib200_topic --lang uig_Arab -o runs/select-uig
  trimix generate -c configs/qwen25_uyghur.yaml --weights-from runs/select-uig/selection.json -p "..."
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "select",
        help="choose fusion weights by fused perplexity on unlabeled prompts",
        description="Score a grid of weights (plus single sources and Proxy Tuning) by the fused model's "
        "perplexity on a task's prompts, refine around the best, and write selection.json + heatmap.png.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--task", help="task whose prompts are scored (default: search.task)")
    p.add_argument("--lang", help="language code, e.g. uig_Arab")
    p.add_argument(
        "--langs",
        nargs="+",
        help="select for several languages (one selection each; with --executor ray, in parallel)",
    )
    p.add_argument("--executor", choices=["local", "ray"], help="with --langs: where the selections run")
    p.add_argument("--ray-address", help="with --executor ray: join this Ray cluster (HOST:PORT)")
    p.add_argument(
        "--split", choices=["train", "dev", "test"], help="split to draw prompts from (default dev)"
    )
    p.add_argument("--text-file", help="score lines of a plain text file instead of task prompts")
    p.add_argument("--n-prompts", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--score", choices=["prompt", "input"], help="count the whole prompt or only the input part"
    )
    p.add_argument(
        "--average",
        choices=["tokens", "texts"],
        help="pool every scored token (default), or average each prompt's mean NLL as the authors' script does",
    )
    p.add_argument("--refine-rounds", type=int)
    p.add_argument(
        "--shots",
        type=int,
        help="exemplars in each scored prompt (in the task's language: the scored text becomes mostly that language)",
    )
    p.add_argument("--output-dir", "-o", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    fields = (
        "task", "lang", "split", "text_file", "n_prompts", "seed", "score", "average", "refine_rounds", "shots"
    )  # fmt: skip
    extra = {f"search.{f}": getattr(args, f) for f in fields if getattr(args, f) is not None}
    config = config_from_args(args, extra)
    search = config.search
    if args.langs:
        return _select_languages(config, args)
    out_dir = prepare_output_dir(args.output_dir, overwrite=args.overwrite)
    build_candidates(search, [m.role for m in config.models])  # fail on a bad search space before loading
    texts, origin = selection_texts(search)
    with folder_lock(out_dir):
        write_run_info(out_dir, config, search.seed)
        lm = FusedLM.from_config(config, load_all=True)
        scorer = lm.scorer(
            texts,
            roles=[m.role for m in config.models],
            chunk_bytes=search.chunk_mb * 2**20,
            progress=not args.quiet,
        )
        result = search_weights(scorer, search, origin, config.fusion.method)
        atomic_write_json(out_dir / "selection.json", result.to_dict())
        result.plot(out_dir / "heatmap.png", list(search.axes()))
    _print_summary(result)
    print(f"selection.json and heatmap.png in {out_dir}; use: --weights-from {out_dir / 'selection.json'}")
    return 0


def _select_languages(config, args: argparse.Namespace) -> int:
    """One selection per language (``selections/<task>_<lang>.json`` + heatmap), through the evaluation
    executors, so that ``--executor ray`` spreads the languages over workers."""
    from trimix.evaluation import Evaluator

    if not config.search.task:
        raise ConfigError("--langs selects on a task's prompts: set --task (or search.task)")
    out_dir = prepare_output_dir(args.output_dir, overwrite=args.overwrite)
    variant = config.model_copy(deep=True)
    variant.eval.methods = [MethodSpec(name="selected", method=config.fusion.method, select=True)]
    variant.eval.tasks = [
        TaskSpec(
            task=config.search.task,
            langs=args.langs,
            split="dev",
            shots=config.search.shots,
            prompt_lang=config.search.prompt_lang,
        )
    ]
    with folder_lock(out_dir):
        write_run_info(out_dir, config, config.search.seed, langs=args.langs)
        evaluator = Evaluator(
            variant, out_dir, progress=not args.quiet, executor=args.executor, ray_address=args.ray_address
        )
        try:
            evaluator.select_missing({("selected", cell.name): ["all"] for cell in evaluator.cell_list})
        finally:
            evaluator.close()
    for cell in evaluator.cell_list:
        result = json.loads(
            (out_dir / SELECTIONS / f"{cell.task.full_name}.json").read_text(encoding="utf-8")
        )
        weights = ", ".join(f"{r}={w:g}" for r, w in result["selected"]["weights"].items())
        print(f"{cell.task.lang}: {weights} (fused ppl {result['selected']['perplexity']:.3f})")
    print(f"selections in {out_dir / SELECTIONS}")
    return 0


def _print_summary(result) -> None:
    def fmt(weights: dict[str, float]) -> str:
        return ", ".join(f"{r}={w:g}" for r, w in weights.items())

    split = result.token_split
    print(
        f"fused perplexity on {result.n_tokens} tokens of {len(result.prompt_ids)} prompts "
        + ("(each prompt's mean NLL averaged) " if result.average == "texts" else "")
        + f"({result.prompts})"
    )
    if split:
        scripts = ", ".join(f"{k} {v}" for k, v in split["by_script"].items())
        print(
            f"  scored tokens: {split['template']} prompt template, {split['task_text']} task text "
            f"({split['template_share']:.0%} template); by script: {scripts}"
        )
    for role, ppl in result.singles.items():
        print(f"  {role + ' alone':<28} {ppl:10.3f}")
    if result.proxy_tuning is not None:
        print(f"  {'proxy tuning (1, 1, -1)':<28} {result.proxy_tuning:10.3f}")
    print(f"  {'best grid point':<28} {result.grid_best.perplexity:10.3f}  {fmt(result.grid_best.weights)}")
    print(
        f"  {'selected (' + result.score + ')':<28} {result.selected.perplexity:10.3f}  {fmt(result.selected.weights)}"
    )
    for mode, chosen in result.by_mode.items():
        label = "whole prompt" if mode == "prompt" else "task text only"
        print(f"  {'scoring ' + label:<28} {chosen['perplexity']:10.3f}  {fmt(chosen['weights'])}")
    for warning in result.warnings:
        print(f"  warning: {warning}")
