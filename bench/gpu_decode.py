"""GPU decoding speed at the paper's shapes: the fused Qwen2.5 7B + 1.5B + 1.5B trio against the bandwidth floor.

Builds random-weight models at the shapes of Qwen2.5-7B (``large``, 152,064 output rows) and two
Qwen2.5-1.5B (151,936 rows, tied embeddings) directly on the GPU in bf16, and a word-level tokenizer
of 151,665 entries (speed does not depend on weight values; no weights to carry). Then, in one run,
on the same prompts (64 tokens each, 64 new tokens, greedy, end-of-sequence ignored):

* the fused trio (weights 0.3 / 0.5 / 0.2, so all three sources run) on the CUDA-graph engine and on
  the eager engine, and the two-source fusion at the paper's 0.1 / 0.9 (small_base at weight 0 is
  not run);
* each source alone through trimix (graphs and eager);
* transformers' ``generate`` of the 7B alone (eager; with ``--hf-compile`` also its static cache with
  its own compile, which costs 15-100 s of warm-up per batch size);
* the bandwidth floor: the bytes of weights each step must read (all three models, minus the 7B's
  untied input embedding, which is gathered not read) over the measured device-to-device copy
  bandwidth;
* with ``--search``: the 36-combination weight search against the sources' plain forward passes
  (16 texts of 257 tokens).

    python bench/gpu_decode.py                      # batch 1 and 8, about 3 minutes on an H100
    python bench/gpu_decode.py --batch-sizes 1 8 32 --hf-compile 1 --search --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from trimix import FusedLM, Fusion, GenerationConfig
from trimix.backends.hf import HFBackend
from trimix.backends.loading import Source
from trimix.config import SourceConfig

logger = logging.getLogger("bench")
VOCAB = 151_665
SHAPES = {
    # role: (hidden, intermediate, layers, heads, kv heads, output rows, tied embeddings)
    "large": (3584, 18944, 28, 28, 4, 152_064, False),
    "small_cpt": (1536, 8960, 28, 12, 2, 151_936, True),
    "small_base": (1536, 8960, 28, 12, 2, 151_936, True),
}


def build_tokenizer(size: int = VOCAB):
    """A word-level tokenizer of ``size`` entries: ``w0`` ... and ``<pad>``, ``<bos>``, ``<eos>`` last."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(size - 3)} | {
        "<pad>": size - 3,
        "<bos>": size - 2,
        "<eos>": size - 1,
    }
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def build_model(
    role: str,
    seed: int,
    shapes: dict = SHAPES,
    vocab: int = VOCAB,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
):
    """A random Qwen2 model of ``shapes[role]`` (Qwen2.5's rotary base), built directly on ``device``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, inter, layers, heads, kv, rows, tied = shapes[role]
    config = Qwen2Config(
        vocab_size=rows,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=tied,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 3,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def read_bytes(model, untied_input_embedding: bool) -> int:
    """Weight bytes one decoding step reads: everything but an untied input embedding (a gather)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if untied_input_embedding:
        embed = model.get_input_embeddings().weight
        total -= embed.numel() * embed.element_size()
    return total


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written (median of 20)."""
    a = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 2 * 2**30 / sorted(times)[len(times) // 2]


def prompts(batch: int, length: int, seed: int, vocab: int = VOCAB) -> list[str]:
    """``batch`` seeded prompts of ``length`` random words of :func:`build_tokenizer`'s vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 3, (batch, length), generator=g)
    return [" ".join(f"w{int(i)}" for i in row) for row in ids]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (captures graphs, compiles)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--hf-compile",
        type=int,
        nargs="*",
        default=[],
        help="batch sizes at which to also time generate with a static cache + its compile (slow warm-up)",
    )
    parser.add_argument("--search", action="store_true", help="also time the 36-combination weight search")
    parser.add_argument(
        "--skip-eager", action="store_true", help="skip trimix's eager engine (slow at batch 32)"
    )
    parser.add_argument("--skip-plain-graphs", action="store_true", help="skip graphs without torch.compile")
    parser.add_argument(
        "--speculative-k",
        type=int,
        default=0,
        help="also time graph-captured draft steps and (k + 1)-token verify steps of each source",
    )
    parser.add_argument(
        "--only", nargs="*", help="measure only these models (trio, paper_0.1_0.9, large, ...)"
    )
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_decode.py needs a CUDA GPU")

    import transformers

    tokenizer = build_tokenizer()
    sources = {}
    for seed, role in enumerate(SHAPES):
        model = build_model(role, seed)
        sources[role] = Source(
            role, HFBackend(model, tokenizer), SourceConfig(model=f"random:{role}", role=role)
        )
    bandwidth = copy_bandwidth()
    floor_bytes = sum(read_bytes(s.model, not SHAPES[r][6]) for r, s in sources.items())
    info = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "host": platform.node(),
        "copy_bandwidth_TBps": bandwidth / 1e12,
        "trio_weight_bytes_per_step": floor_bytes,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
    }
    print(f"# {info['device']} · torch {info['torch']} · transformers {info['transformers']}")
    print(f"# copy bandwidth {bandwidth / 1e12:.2f} TB/s; trio reads {floor_bytes / 1e9:.1f} GB per step")
    all_roles = list(SHAPES)
    trio = FusedLM(
        list(sources.values()), Fusion(dict(zip(all_roles, (0.3, 0.5, 0.2), strict=True)), "trimix")
    )
    paper = trio.with_weights(large=0.1, small_cpt=0.9)
    alone = {role: FusedLM([sources[role]]) for role in all_roles}
    rows = []
    for batch in args.batch_sizes:
        row = measure(
            batch, args, {"trio": trio, "paper_0.1_0.9": paper} | alone, sources["large"], tokenizer
        )
        row["floor_tok_s"] = batch / (floor_bytes / bandwidth)
        row["trio_graphs_vs_floor"] = row.get("trio_graphs", float("nan")) / row["floor_tok_s"]
        row["trio_graphs_vs_hf_7b_eager"] = row.get("trio_graphs", float("nan")) / row["hf_generate_7b_eager"]
        rows.append(row)
        if args.json:
            Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
        print(
            f"batch {batch:>3}: trio graphs {row['trio_graphs']:8.1f} tok/s = {row['trio_graphs_vs_floor']:.2f} of "
            f"floor {row['floor_tok_s']:7.1f}; {row['trio_graphs_vs_hf_7b_eager']:.2f}x HF generate 7B eager "
            f"({row['hf_generate_7b_eager']:.1f})",
            flush=True,
        )
    print()
    keys = [k for k in rows[0] if k != "batch"]
    print("| figure | " + " | ".join(f"batch {r['batch']}" for r in rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "batch"))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{r.get(key, float('nan')):.2f}" for r in rows) + " |")
    if args.speculative_k:
        info["speculative_costs"] = speculative_costs(sources, args.batch_sizes, args.speculative_k)
    if args.search:
        info["search"] = search_cost(trio, tokenizer)
        print(f"\nweight search: {json.dumps(info['search'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")


def measure(
    batch: int, args: argparse.Namespace, models: dict[str, FusedLM], large: Source, tokenizer
) -> dict:
    """tok/s of every model on every engine, and of transformers' generate of the 7B, at one batch size."""
    texts = prompts(batch, args.prompt_tokens, seed=batch)
    gen = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True, batch_size=batch)
    row: dict[str, float] = {"batch": batch}
    # Eager first: nothing compiled or captured yet at this batch size, so host-side overhead is measured
    # undisturbed (transformers' generate of the 7B, then trimix's eager engine).
    row["hf_generate_7b_eager"] = hf_generate(large, tokenizer, texts, args)
    variants = {} if args.skip_eager else {"eager": {"engine": "eager"}}
    if not args.skip_plain_graphs:
        variants["graphs_nocompile"] = {"engine": "graphs", "compile": False}
    variants["graphs"] = {"engine": "graphs", "compile": True}
    for variant, settings in variants.items():
        for name, lm in models.items():
            start = time.perf_counter()
            seconds = timed(
                lambda lm=lm, settings=settings: lm.generate(texts, gen, **settings), args.repeats
            )
            row[f"{name}_{variant}"] = batch * args.new_tokens / seconds
            logger.warning(
                "%s %s batch %d: %.1f tok/s (%.0fs incl. warm-up)",
                name,
                variant,
                batch,
                row[f"{name}_{variant}"],
                time.perf_counter() - start,
            )
    if batch in args.hf_compile:
        row["hf_generate_7b_static_compile"] = hf_generate(
            large, tokenizer, texts, args, cache_implementation="static"
        )
    return row


def hf_generate(large: Source, tokenizer, texts: list[str], args: argparse.Namespace, **kwargs) -> float:
    """tok/s of transformers' own greedy generate of the 7B alone on the same prompts."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left").to("cuda")

    def run() -> None:
        with torch.inference_mode():
            large.model.generate(
                **enc,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                **kwargs,
            )

    return len(texts) * args.new_tokens / timed(run, args.repeats)


def step_cost(source: Source, batch: int, width: int, repeats: int = 30) -> float:
    """Seconds per replay of one source's compiled, graph-captured forward of ``width`` tokens per row
    (width 1: a decoding or drafting step; width k + 1: speculative verification of k drafts)."""
    backend = source.backend
    prompt = torch.randint(0, VOCAB - 3, (batch, 64), device="cuda")
    capacity = 64 + width * (repeats + 8)
    with torch.inference_mode():
        _, state = backend.prefill(prompt, torch.ones_like(prompt), capacity)
        cols = torch.arange(state.length, state.length + width, device="cuda")
        state.cursor.cols = cols
        tokens = torch.randint(0, VOCAB - 3, (batch, width), device="cuda")
        snapshot = (state.valid.clone(), state.positions.clone(), state.next_position.clone(), cols.clone())

        def restore() -> None:
            for target, value in zip(
                (state.valid, state.positions, state.next_position, cols), snapshot, strict=True
            ):
                target.copy_(value)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                backend.step_in_place(state, tokens, compiled=True)
        torch.cuda.current_stream().wait_stream(stream)
        restore()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            backend.step_in_place(state, tokens, compiled=True)
        restore()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def speculative_costs(sources: dict[str, Source], batches: list[int], k: int) -> list[dict[str, float]]:
    """Per batch: the cost of a draft step (small_cpt, width 1) and of a (k + 1)-token verify per source."""
    rows = []
    for batch in batches:
        row = {"batch": batch, "k": k}
        for role, source in sources.items():
            row[f"{role}_step_ms"] = 1000 * step_cost(source, batch, 1)
            row[f"{role}_verify_{k + 1}_ms"] = 1000 * step_cost(source, batch, k + 1)
        rows.append(row)
        print(
            f"speculative costs batch {batch}: "
            + ", ".join(f"{key} {v:.2f}" for key, v in row.items() if key.endswith("ms")),
            flush=True,
        )
    return rows


def search_cost(trio: FusedLM, tokenizer) -> dict[str, float]:
    """36-combination search vs the sources' plain forward passes, 16 texts of 257 tokens."""
    from trimix.config import SearchConfig
    from trimix.search import ScoringText, build_candidates

    texts = [ScoringText(f"t{i}", p) for i, p in enumerate(prompts(16, 256, seed=99))]
    roles = list(trio.roles)
    points, _ = build_candidates(SearchConfig(), roles)
    weights = torch.tensor([[p[r] for r in roles] for p in points])

    def plain() -> None:
        with torch.inference_mode():
            for text in texts:
                ids = tokenizer(text.text, return_tensors="pt")["input_ids"].cuda()
                for source in trio.sources:
                    source.model(input_ids=ids)

    def search() -> None:
        trio.scorer(texts, progress=False, share_prefix=False).score(weights)

    plain_s, search_s = timed(plain, 2), timed(search, 2)
    return {"plain_forwards_s": plain_s, "search_36_s": search_s, "ratio": search_s / plain_s}


if __name__ == "__main__":
    main()
