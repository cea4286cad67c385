"""``trimix generate``: fused decoding of prompts from arguments, a file or stdin, written as JSONL."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tqdm.auto import tqdm

from trimix.backends.loading import format_prompt, load_tokenizer, source_context
from trimix.cli.common import add_config_args, config_from_args, read_prompts
from trimix.decoding import FusedLM, TokenInspection
from trimix.decoding.speculative import describe_stats
from trimix.errors import ConfigError, DataError
from trimix.io import JsonlSink, read_jsonl
from trimix.runinfo import (
    describe_change,
    fingerprint,
    locked_output_dir,
    read_run_json,
    write_run_info,
)

logger = logging.getLogger(__name__)

EXAMPLE = """example:
  trimix generate -c configs/gemma3_270m_demo_generate.yaml --prompt "Hello" --max-new-tokens 16
  trimix generate -c configs/qwen25_uyghur.yaml --weights-from runs/select/selection.json \\
      --prompts-file prompts.jsonl --output-dir runs/gen
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text with fused sources",
        description="Generate text whose every token comes from the weighted sum of the sources' logits.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--prompt", "-p", action="append", help="a prompt (repeatable)")
    p.add_argument(
        "--prompts-file", "-f", help="a .txt file (one prompt per line) or .jsonl with a 'prompt' field"
    )
    p.add_argument(
        "--output-dir",
        "-o",
        help="write generations.jsonl (as batches finish), config.yaml and run.json here",
    )
    p.add_argument("--overwrite", action="store_true", help="start afresh in a non-empty --output-dir")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a run in --output-dir: generate only the prompts not done yet",
    )
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--do-sample", action="store_true", default=None)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--batch-size", type=int)
    p.add_argument(
        "--inspect", type=int, dest="inspect_top_k", help="record each source's top-K candidates per token"
    )
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument(
        "--engine", choices=["auto", "eager", "static", "graphs"], help="decoding engine (see README)"
    )
    p.add_argument(
        "--speculative",
        metavar="K",
        help="speculative fusion: the largest-weight source drafts K tokens (or 'auto'), all sources verify them",
    )
    p.add_argument(
        "--draft-vocab",
        type=int,
        metavar="N",
        help="speculative fusion: the drafter proposes only among the N tokens most frequent in --draft-vocab-text",
    )
    p.add_argument(
        "--draft-vocab-text",
        nargs="+",
        metavar="TEXT",
        help="text files (or sib200:LANG:SPLIT) in the languages you decode, for --draft-vocab",
    )
    p.set_defaults(func=run)


GENERATIONS = "generations.jsonl"


def run(args: argparse.Namespace) -> int:
    fields = (
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "seed",
        "batch_size",
        "inspect_top_k",
        "engine",
    )
    extra = {f"generation.{f}": getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.stop:
        extra["generation.stop"] = args.stop
    if args.speculative is not None:
        extra["generation.speculative.k"] = args.speculative  # validated with the config ("auto" or 1-16)
    if args.draft_vocab is not None:
        extra["generation.speculative.draft_vocab"] = args.draft_vocab
    if args.draft_vocab_text:
        extra["generation.speculative.draft_vocab_text"] = args.draft_vocab_text
    config = config_from_args(args, extra)
    prompts = read_prompts(args.prompt, args.prompts_file)
    if args.resume and not args.output_dir:
        raise ConfigError("--resume continues a run folder: pass it as --output-dir")
    refuse_overlong(config, prompts)  # tokenizers and configs only: before any weight loads
    if args.output_dir is None:
        lm = FusedLM.from_config(config)
        _print_or_stream(lm, config, prompts, args, sink=None)
        return 0
    with locked_output_dir(
        args.output_dir, overwrite=args.overwrite, resume=args.resume, progress_files=(GENERATIONS,)
    ) as out_dir:
        description = run_description(config, prompts)
        check_resume(out_dir, description, args.resume)
        done = {str(r["id"]) for r in read_jsonl(out_dir / GENERATIONS)}
        pending = [p for p in prompts if str(p["id"]) not in done]
        if done:
            logger.info("--resume: %d of %d prompts already generated", len(done), len(prompts))
        write_run_info(
            out_dir,
            config,
            config.generation.seed,
            resumed=args.resume,
            fingerprint=fingerprint(description),
            description=description,
        )
        lm = FusedLM.from_config(config)
        sink = JsonlSink(out_dir / GENERATIONS, fault="generate.row")
        try:
            _print_or_stream(lm, config, pending, args, sink)
        finally:
            sink.close()
    logger.info("wrote %s", out_dir / GENERATIONS)
    return 0


def _print_or_stream(
    lm: FusedLM, config, prompts: list[dict], args: argparse.Namespace, sink: JsonlSink | None
) -> None:
    """Decode batch by batch; each finished batch is printed and appended (durably) to the results file."""
    gen = config.generation
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=args.quiet or args.stream)
    for start in range(0, len(prompts), gen.batch_size):
        batch = prompts[start : start + gen.batch_size]
        texts, ids = [p["prompt"] for p in batch], [p["index"] for p in batch]
        if args.stream:
            generations = _stream(lm, texts, ids, gen, batch, single=len(prompts) == 1)
        else:
            generations = lm.generate(texts, gen, row_ids=ids)
        rows = [{"id": p["id"], **g.to_dict()} for p, g in zip(batch, generations, strict=True)]
        if sink is not None:  # on disk before it is printed: what the user saw is never lost
            sink.write(rows)
        if not args.stream:
            for row in rows:
                print(json.dumps(row, ensure_ascii=False))
            sys.stdout.flush()
        if gen.inspect_top_k and not args.quiet:
            for p, g in zip(batch, generations, strict=True):
                table = inspection_table(str(p["id"]), g.inspection or [])
                tqdm.write(table + speculative_summary(g.stats), file=sys.stderr)
        bar.update(len(batch))
    bar.close()


def _stream(lm: FusedLM, texts: list[str], ids: list[int], gen, batch: list[dict], single: bool) -> list:
    """Print tokens as they come (one prompt: plain text; several: one JSON event per token)."""
    results = [None] * len(texts)
    for event in lm.stream(texts, gen, row_ids=ids):
        if event.generation is not None:
            results[event.index] = event.generation
        if single:
            sys.stdout.write(event.text + ("\n" if event.finished else ""))
        else:
            line = {"id": batch[event.index]["id"], "text": event.text, "finished": event.finished}
            print(json.dumps(line, ensure_ascii=False))
        sys.stdout.flush()
    return results


def speculative_summary(stats: dict | None) -> str:
    """One line of speculative accounting under a prompt's inspection table ("" without speculation)."""
    return f"\nspeculative: {describe_stats(stats)}" if stats and stats.get("rounds") else ""


def inspection_table(prompt_id: str, inspection: list[TokenInspection], top: int = 3) -> str:
    """A readable table of which source drove each generated token (the JSON keeps every detail).

    One line per token: the token as text, its fused probability, the leading source (largest share
    of the fused margin over the runner-up) with the shares, and each source's top candidates.
    """
    if not inspection:
        return f"prompt {prompt_id}: no tokens generated"
    roles = list(inspection[0].sources)
    lines = [f"prompt {prompt_id}: {len(inspection)} tokens (candidates: token probability)"]
    header = f"{'#':>3}  {'token':<14} {'p':>5}  {'leader':<12} {'margin shares':<{9 * len(roles)}}"
    lines.append(header + "  " + "  ".join(f"{role + ' top':<30}" for role in roles))
    for i, step in enumerate(inspection):
        shares = " ".join(f"{step.contributions.get(r, 0.0):>+8.2f}" for r in roles)
        candidates = []
        for role in roles:
            view = step.sources[role]
            shown = ", ".join(f"{_quoted(t)} {p:.2f}" for t, p in view.top[:top])
            candidates.append(f"{shown:<30}")
        lines.append(
            f"{i:>3}  {_quoted(step.token):<14} {step.fused_prob:>5.2f}  {step.leader or '-':<12} "
            f"{shares:<{9 * len(roles)}}  " + "  ".join(candidates)
        )
    lines.append(
        f"margin shares, in order: {', '.join(roles)} (they sum to the fused logit margin over the runner-up)"
    )
    return "\n".join(lines)


def _quoted(token: str) -> str:
    """A token for a table cell: quoted so spaces show, newlines and tabs escaped, at most 12 characters."""
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    return f"'{text if len(text) <= 12 else text[:11] + '…'}'"


def run_description(config, prompts: list[dict]) -> dict:
    """What determines a generation run's results (its fingerprint guards --resume)."""
    generation = config.generation.model_dump(mode="json", exclude={"batch_size", "engine", "compile"})
    return {
        "fusion": config.resolved_fusion().to_dict(),
        "generation": generation,
        "models": [m.model_dump(mode="json", exclude={"weight"}) for m in config.models],
        "dtype": config.dtype,
        "prompts": fingerprint({"prompts": [[str(p["id"]), p["prompt"]] for p in prompts]}),
    }


def check_resume(out_dir: Path, description: dict, resume: bool) -> None:
    """Refuse to continue generations made with other settings or other prompts (naming the changes)."""
    if not resume or not (out_dir / GENERATIONS).is_file():
        return
    info = read_run_json(out_dir) or {}
    before = info.get("description")
    if before is None:
        raise ConfigError(
            f"{out_dir / GENERATIONS} was written without a run fingerprint, so --resume cannot check it matches; "
            "start afresh with --overwrite (or choose another --output-dir)"
        )
    if changes := "; ".join(describe_change(before, description)):
        raise ConfigError(
            f"--resume: {out_dir} was generated with other settings or prompts ({changes}); "
            "use the same settings, or --overwrite to start afresh"
        )


def refuse_overlong(config, prompts: list[dict]) -> None:
    """A prompt whose length plus max_new_tokens exceeds a source's context is refused before models load
    (only tokenizers and model configs are read)."""
    gen = config.generation
    if gen.on_context_limit != "error":
        return
    for role in config.resolved_fusion().roles:
        source = config.source(role)
        context = source_context(source, config.cache_dir)
        if context is None:
            continue
        tokenizer = load_tokenizer(source, config.cache_dir)
        for prompt in prompts:
            text = format_prompt(tokenizer, source, prompt["prompt"])
            length = len(tokenizer(text, add_special_tokens=source.prompt_format == "raw")["input_ids"])
            if length + gen.max_new_tokens > context:
                raise DataError(
                    f"prompt {prompt['id']!r} has {length} tokens for source {role!r}; with max_new_tokens "
                    f"{gen.max_new_tokens} it needs {length + gen.max_new_tokens} positions, more than the source's "
                    f"context of {context}. Shorten it or lower --max-new-tokens"
                )
