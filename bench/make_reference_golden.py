"""Golden data for ``tests/test_reference_impl.py``: what the TriMix authors' implementation outputs on
the test models, so that the test compares trimix against it on any machine, without their code.

Run once where the reference was fetched into ``.reference/`` (see ``bench/reference_compare.py``):

    python bench/make_reference_golden.py --reference-commit <the TriMix commit checked out>

(``--reference-commit`` may be left out when ``.reference/TriMix`` is a git checkout.) It writes, under
``tests/golden/reference/``, one JSON file per decoding case of the test and ``paper_prompts.json``:

* ``<case>.json``: the models' build recipe and fingerprint, the prompts (texts and the token ids both
  sides decode), the reference's generated ids per batch size, and, with a search, its perplexity over
  the paper's 6 x 6 grid, its scored token ids and its selected weights. Beside each generated token:
  the **decision margin** of that greedy step, computed on trimix's side by teacher-forcing the
  reference's tokens (see :func:`decision_margins`), with which the test tells a real difference from a
  float32 near-tie that another CPU may break the other way.
* ``paper_prompts.json``: the strings the authors' ``prompts.py`` builds from the MiLiC fixture items of
  ``tests/conftest.py`` (with the items' sha256, so a changed fixture is noticed).

Only outputs are stored (token ids, numbers, prompt strings), never the reference's code. The script
also checks, as ``reference_compare.py --check-tokens`` does, that trimix reproduces what it records,
and refuses to write otherwise. The test imports the model-building, margin and comparison functions
from here, so both sides build and judge the same way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_compare as rc  # puts src/ on the path too

import trimix
from trimix import GenerationConfig
from trimix.config import PAPER_GRID
from trimix.fusion import fuse_rows
from trimix.testing import save_tiny_trio

ROOT = rc.ROOT
GOLDEN = ROOT / "tests" / "golden" / "reference"
SCHEMA = 1
BATCH_SIZES = (1, 3)  # batch 3 over 8 prompts: ragged, left-padded batches
PROMPTS = 8
NEW_TOKENS = 16
PROMPT_TOKENS = 64  # words per prompt (mini)
# The cases of tests/test_reference_impl.py (the arguments its live mode gives reference_compare.py).
CASES: dict[str, dict[str, Any]] = {
    # All three sources, plausibility on small_cpt (the reference's default); large has 8 padded rows.
    "trimix_plausibility": {"shapes": "tiny", "padded_rows": 8, "weights": [0.3, 0.5], "alpha": 0.1},
    # Proxy Tuning, no constraint; and both weight searches on models without padded rows.
    "proxy_tuning": {
        "shapes": "tiny",
        "padded_rows": 0,
        "weights": [1.0, 1.0],
        "alpha": 0.0,
        "search": {"texts": 16, "tokens": 256},
    },
    # The GPU run's word-level Qwen2.5 structure at CPU size (padded rows: perplexities differ there).
    "mini": {"shapes": "mini", "weights": [0.3, 0.5], "alpha": 0.1, "search": {"texts": 4, "tokens": 32}},
}
PAPER_TASKS = ("rc", "rs", "title", "math", "ug2en", "zh2ug")


# ------------------------------------------------------------------ models, shared with the test
def build_models(case: dict, root: Path) -> dict[str, Path]:
    """The case's trio saved under root as reference_compare.py saves it (float32, on the CPU), each folder
    made readable by the reference's transformers 4.47 (which trimix reads the same)."""
    if case["shapes"] == "tiny":
        paths = save_tiny_trio(root, padded_rows=case["padded_rows"], rope_theta=1e6)
    else:
        paths = rc.save_word_level_trio(root, case["shapes"], "cpu")
    for folder in paths.values():
        rc.portable_checkpoint(folder)
    return paths


def model_recipe(case: dict) -> dict:
    """How the test models are built, in words and arguments (recorded in the golden file)."""
    if case["shapes"] == "tiny":
        return {
            "builder": "trimix.testing.save_tiny_trio",
            "arguments": {"arch": "qwen2", "padded_rows": case["padded_rows"], "rope_theta": 1e6},
            "seeds": {"large": 1, "small_cpt": 2, "small_base": 3},
            "then": "bench/reference_compare.py portable_checkpoint on each folder",
        }
    return {
        "builder": "bench/reference_compare.py save_word_level_trio",
        "arguments": {"shapes": case["shapes"], "device": "cpu"},
        "seeds": {"large": 0, "small_cpt": 1, "small_base": 2},
        "then": "bench/reference_compare.py portable_checkpoint on each folder",
    }


def load_fused(case: dict, paths: dict[str, Path], weights: list[float] | None = None) -> trimix.FusedLM:
    """trimix over the saved trio with the case's weights (or ``weights``) and plausibility rule."""
    a, b = weights or case["weights"]
    plausibility = {"role": "small_cpt", "alpha": case["alpha"]} if case["alpha"] else None
    return trimix.load(
        {
            "models": [
                {"model": str(paths["large"]), "role": "large", "weight": a},
                {"model": str(paths["small_cpt"]), "role": "small_cpt", "weight": b},
                {"model": str(paths["small_base"]), "role": "small_base"},  # 1 - a - b
            ],
            "fusion": {"method": "trimix", "plausibility": plausibility},
            "dtype": "float32",
            "device": "cpu",
        }
    )


def fingerprint(lm: trimix.FusedLM, probe: list[int]) -> dict[str, dict]:
    """Per source: the sha256 of its float32 weights (bit-exact, so it differs between CPUs whose
    ``normal_`` kernels round differently: AVX2/AVX-512 vs ``ATEN_CPU_CAPABILITY=default``), every
    tensor's shape and float64 norm, and its logits at the last position of ``probe`` (first 8 values
    and the norm) — these last two survive last-bit differences and change entirely with the build."""
    out = {}
    with torch.inference_mode():
        for source in lm.sources:
            digest = hashlib.sha256()
            tensors = {}
            for name, value in sorted(source.model.state_dict().items()):
                data = value.detach().float().contiguous()
                digest.update(name.encode())
                digest.update(data.numpy().tobytes())
                tensors[name] = [list(data.shape), float(data.double().norm())]
            logits = source.model(input_ids=torch.tensor([probe])).logits[0, -1].double()
            out[source.role] = {
                "sha256": digest.hexdigest(),
                "tensors": tensors,
                "probe_logits_head": logits[:8].tolist(),
                "probe_logits_norm": float(logits.norm()),
            }
    return out


def fingerprint_differences(mine: dict, golden: dict, rtol: float = 1e-4) -> list[str]:
    """What differs between two fingerprints beyond float32 rounding (empty: the same models). Norms and
    probe logits are compared to ``rtol`` (relative to the norm), far above the ~1e-7 of last-bit
    differences in the weights and far below what a changed seed, size or init scheme does."""
    problems = []
    for role, theirs in golden.items():
        ours = mine.get(role)
        if ours is None:
            problems.append(f"{role}: not among the sources trimix loaded ({', '.join(mine)})")
            continue
        if ours["sha256"] == theirs["sha256"]:
            continue
        if ours["tensors"].keys() != theirs["tensors"].keys():
            problems.append(f"{role}: other tensors ({sorted(ours['tensors'].keys() ^ theirs['tensors'])})")
            continue
        for name, (shape, norm) in theirs["tensors"].items():
            my_shape, my_norm = ours["tensors"][name]
            if my_shape != shape or abs(my_norm - norm) > rtol * max(norm, 1e-12):
                problems.append(
                    f"{role}.{name}: shape/norm {my_shape}/{my_norm:.6g}, golden {shape}/{norm:.6g}"
                )
        scale = theirs["probe_logits_norm"]
        head = max(
            abs(x - y) for x, y in zip(ours["probe_logits_head"], theirs["probe_logits_head"], strict=True)
        )
        if head > rtol * scale or abs(ours["probe_logits_norm"] - scale) > rtol * scale:
            problems.append(f"{role}: probe logits differ by up to {head:.3g} (norm {scale:.3g})")
    return problems


# ------------------------------------------------------------------ decoding, shared with the test
def prompt_ids(lm: trimix.FusedLM, texts: list[str]) -> list[list[int]]:
    """The token ids trimix feeds its sources (and the reference was given) for each prompt, unpadded."""
    enc = lm.encode(lm.sources[0], texts)
    return [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]


def trimix_tokens(lm: trimix.FusedLM, texts: list[str], batch: int, new_tokens: int) -> list[list[int]]:
    """trimix's greedy ids for every text at ``batch`` (eager engine, fixed length as the reference runs)."""
    gen = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, batch_size=batch, engine="eager")
    return [g.token_ids for g in lm.generate(texts, gen)]


@torch.inference_mode()
def decision_margins(
    lm: trimix.FusedLM, prompts: list[list[int]], rows: list[list[int]]
) -> list[list[float]]:
    """How far each greedy step of ``rows`` (continuations of ``prompts``) is from choosing otherwise, in
    nats, under trimix's fusion: each source runs once over prompt + continuation (teacher forcing), and
    at each position the margin is the smallest of

    * the chosen token's fused score minus the best other token's that the constraint keeps (the fused
      top-1 vs top-2 log-probability gap, the softmax normaliser cancelling);
    * with a plausibility constraint, the chosen token's log-probability under the judging source above
      the threshold ``log p_max + log alpha``, and, for each token fused above the chosen one but cut,
      its distance below the threshold (either crossing would change the choice).

    A negative margin: trimix would choose another token there.
    """
    vocab = lm.vocab_size
    index = lm.plausibility_index
    alpha = lm.fusion.plausibility.alpha if index is not None else None
    weights = torch.tensor([lm.weight_vector()], dtype=torch.float32)
    inf = torch.tensor(float("inf"))
    margins = []
    for prompt, tokens in zip(prompts, rows, strict=True):
        ids = torch.tensor([prompt + tokens[:-1]])
        start = len(prompt) - 1
        logits = [s.model(input_ids=ids).logits[0, start:, :vocab].float() for s in lm.sources]
        fused = fuse_rows(logits, weights.expand(len(tokens), -1), vocab)
        chosen = torch.tensor(tokens)[:, None]
        score = fused.gather(1, chosen).squeeze(1)
        keep = torch.ones_like(fused, dtype=torch.bool)
        margin = torch.full_like(score, float("inf"))
        if index is not None:
            judge = logits[index]
            threshold = judge.max(dim=1, keepdim=True).values + math.log(alpha)
            keep = judge >= threshold
            margin = torch.minimum(margin, (judge.gather(1, chosen) - threshold).squeeze(1))
            above_but_cut = (fused > score[:, None]) & ~keep
            margin = torch.minimum(margin, torch.where(above_but_cut, threshold - judge, inf).min(1).values)
        others = fused.masked_fill(~keep, float("-inf")).scatter(1, chosen, float("-inf"))
        margin = torch.minimum(margin, score - others.max(1).values)
        margins.append(margin.tolist())
    return margins


def compare_tokens(
    ours: list[list[int]], theirs: list[list[int]], margins: list[list[float]], bound: float
) -> dict[str, Any]:
    """Row by row: tokens must be identical at every position up to the first whose decision margin is
    under ``bound`` (a near-tie: float32 rounding on another CPU may break it the other way, and every
    later token then follows another prefix); the row is not compared from there on.

    Returns the rows, the positions compared, ``cut`` ((row, position, margin) of each near-tie) and
    ``mismatches`` ((row, position, ours, theirs) of each first difference before a near-tie)."""
    report: dict[str, Any] = {"rows": len(theirs), "compared": 0, "cut": [], "mismatches": []}
    for r, (mine, golden, margin) in enumerate(zip(ours, theirs, margins, strict=True)):
        tie = next((i for i, m in enumerate(margin) if m < bound), len(margin))
        if tie < len(margin):
            report["cut"].append((r, tie, margin[tie]))
        report["compared"] += tie
        if len(mine) != len(golden):
            report["mismatches"].append((r, "length", len(mine), len(golden)))
            continue
        first = next((i for i in range(tie) if mine[i] != golden[i]), None)
        if first is not None:
            report["mismatches"].append((r, first, mine[first], golden[first]))
    return report


# ------------------------------------------------------------------ prompts, shared with the test
def paper_prompt_inputs(module: Any, task: str, items: list[dict], shots: int, prompt_lang: str) -> list[str]:
    """The authors' prompt strings (their prompts.py, ``module``) for a MiLiC task on Uyghur items."""
    exemplars = items if shots else None
    build = {
        "rc": lambda: module.convert_dataset_into_prompt_comprehension(
            items, exemplars, "ug", shots, prompt_lang=prompt_lang
        ),
        "rs": lambda: module.convert_dataset_into_prompt_response(
            items, exemplars, "ug", shots, prompt_lang=prompt_lang
        ),
        "title": lambda: module.convert_dataset_into_prompt_title(
            items, exemplars, "ug", shots, 256, prompt_lang=prompt_lang
        ),
        "math": lambda: module.convert_dataset_into_prompt_math(
            items, exemplars, "ug", shots, prompt_lang=prompt_lang
        ),
        "ug2en": lambda: module.convert_dataset_into_prompt_translation(
            items, exemplars, "ug", "en", shots, prompt_lang=prompt_lang
        ),
        "zh2ug": lambda: module.convert_dataset_into_prompt_translation(
            items, exemplars, "zh", "ug", shots, prompt_lang=prompt_lang
        ),
        "classification": lambda: module.convert_dataset_into_prompt_classification(
            items, exemplars, "ug", shots, max_passage_len=512, prompt_lang=prompt_lang
        ),
    }[task]
    return [x["input"] for x in build()]


def paper_task_folder(task: str) -> str:
    """The MiLiC fixture folder a paper task's items come from."""
    return {
        "rc": "reading_comprehension",
        "rs": "response_selection",
        "title": "title_generation_200",
        "math": "math",
        "ug2en": "translation_dialogue",
        "zh2ug": "translation_dialogue",
        "classification": "text_classification",
    }[task]


def items_digest(milic: dict) -> str:
    """sha256 of the MiLiC fixture items (tests/conftest.py's MILIC), as canonical JSON."""
    return hashlib.sha256(json.dumps(milic, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def load_paper_prompts_module(reference_code: Path) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_prompts", reference_code / "prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ writing
def reference_commit(code: Path, given: str | None) -> str:
    if given:
        return given
    done = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True, text=True)
    if done.returncode != 0 or not (code / ".git").exists():
        raise SystemExit(f"{code} is not a git checkout: give the TriMix commit with --reference-commit")
    return done.stdout.strip()


def provenance(args: argparse.Namespace, commit: str, reference: dict | None = None) -> dict:
    import transformers

    code = Path(args.reference_code)
    info = {
        "script": "bench/make_reference_golden.py",
        "command": "python bench/make_reference_golden.py --reference-commit " + commit,
        "reference": {
            "repository": "https://github.com/luciusssss/TriMix",
            "commit": commit,
            "sha256": {
                name: hashlib.sha256((code / name).read_bytes()).hexdigest()
                for name in ("dexperts.py", "get_perplexity.py", "prompts.py")
            },
        },
        "trimix_side": {"torch": torch.__version__, "transformers": transformers.__version__},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
        },
    }
    if reference:
        info["reference"] |= {k: reference[k] for k in ("transformers", "torch")}
        info["reference"]["pins"] = list(rc.REFERENCE_PINS)
    return info


def golden_case(
    name: str, case: dict, site: Path, workdir: Path, args: argparse.Namespace, commit: str
) -> dict:
    """Run the reference and trimix on the case; the golden record (SystemExit if trimix disagrees)."""
    paths = build_models(case, workdir / name)
    lm = load_fused(case, paths)
    count = max(PROMPTS, *BATCH_SIZES)
    texts = rc.prompt_texts(case["shapes"], count, PROMPT_TOKENS)
    ids = prompt_ids(lm, texts)
    a, b = case["weights"]
    job = {
        "reference_code": str(Path(args.reference_code).resolve()),
        "models": {role: str(p) for role, p in paths.items()},
        "weights": [a, b],
        "plausibility": {"model": "expert", "alpha": case["alpha"]} if case["alpha"] else None,
        "dtype": "float32",
        "device": "cpu",
        "pad_token_id": lm.sources[0].tokenizer.pad_token_id,
        "prompts": ids,
        "batch_sizes": list(BATCH_SIZES),
        "min_prompts": PROMPTS,
        "new_tokens": NEW_TOKENS,
        "repeats": 1,
    }
    search = case.get("search")
    search_texts = []
    if search:
        search_texts = (
            rc.prompt_texts("tiny", search["texts"] + 3, 0)[3:]
            if case["shapes"] == "tiny"
            else rc.prompt_texts(case["shapes"], search["texts"], search["tokens"])
        )
        job |= {"search_texts": search_texts, "search_grid": list(PAPER_GRID)}
    run_dir = workdir / f"{name}-run"
    run_dir.mkdir()
    reference = rc.run_reference(job, site, run_dir)
    ours = {s.role: rc.model_facts(s.model) for s in lm.sources}
    if any(ours[r] != reference["models"][r] for r in ours):
        raise SystemExit(f"{name}: the reference read other models: {ours} vs {reference['models']}")
    rows = []
    for row in reference["rows"]:
        n = row["prompts"]
        margins = decision_margins(lm, ids[:n], row["tokens"])
        report = compare_tokens(
            trimix_tokens(lm, texts[:n], row["batch"], NEW_TOKENS), row["tokens"], margins, args.margin_bound
        )
        if report["mismatches"]:
            raise SystemExit(f"{name}, batch {row['batch']}: trimix decodes other tokens: {report}")
        rows.append(
            {
                "batch": row["batch"],
                "tokens": row["tokens"],
                "margins": [[float(f"{m:.4g}") for m in r] for r in margins],
            }
        )
        smallest = min(min(m) for m in margins)
        print(
            f"{name} batch {row['batch']}: {n} rows identical up to near-ties ({len(report['cut'])} rows "
            f"cut there); smallest margin {smallest:.3g}",
            flush=True,
        )
    record = {
        "schema": SCHEMA,
        "case": name,
        "produced_by": provenance(args, commit, reference) | {"case_arguments": case},
        "models": {"recipe": model_recipe(case), "fingerprint": fingerprint(lm, ids[0])},
        "fusion": {
            "weights": {"large": a, "small_cpt": b, "small_base": "1 - large - small_cpt"},
            "plausibility": {"role": "small_cpt", "alpha": case["alpha"]} if case["alpha"] else None,
        },
        "prompts": {"texts": texts, "token_ids": ids},
        "generation": {
            "new_tokens": NEW_TOKENS,
            "margins": "decision margins in nats on trimix's side, teacher-forced on the reference's tokens "
            "(bench/make_reference_golden.py decision_margins)",
            "rows": rows,
        },
    }
    if search:
        theirs = reference["search"]
        mine = rc.trimix_search(lm, search_texts, list(PAPER_GRID))
        summary = rc.compare_search(mine, theirs)
        if not summary["same_scored_tokens"]:
            raise SystemExit(f"{name}: the searches scored different tokens")
        ranked = sorted(p["perplexity"] for p in theirs["points"])
        padded = any(s.model.config.vocab_size > lm.vocab_size for s in lm.sources)
        record["search"] = {
            "texts": search_texts,
            "grid": list(PAPER_GRID),
            "token_ids": theirs["token_ids"],
            "points": theirs["points"],
            "reference_selects": summary["reference_selects"],
            "relative_gap_to_second": (ranked[1] - ranked[0]) / ranked[0],
            "padded_rows": padded,
            "trimix_max_relative_difference_here": summary["max_relative_difference"],
        }
        print(
            f"{name} search: largest relative difference {summary['max_relative_difference']:.2e}, "
            f"selected: reference {summary['reference_selects']}, trimix {summary['trimix_selects']}",
            flush=True,
        )
    return record


def golden_prompts(args: argparse.Namespace, commit: str) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import MILIC

    module = load_paper_prompts_module(Path(args.reference_code))
    entries = {}
    for task in (*PAPER_TASKS, "classification"):
        for prompt_lang in ("en", "zh"):
            for shots in (0, 1) if task == "classification" else (0, 3):
                items = MILIC[paper_task_folder(task)]
                entries[f"{task}/{prompt_lang}/{shots}"] = paper_prompt_inputs(
                    module, task, items, shots, prompt_lang
                )
    return {
        "schema": SCHEMA,
        "produced_by": provenance(args, commit)
        | {
            "note": "prompts.py on tests/conftest.py's MILIC items; classification walks a set of labels, "
            "whose order depends on PYTHONHASHSEED (the script runs under PYTHONHASHSEED=0)"
        },
        "items_sha256": items_digest(MILIC),
        "prompts": entries,
    }


def write(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1024:.0f} KiB)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference-code", default=str(ROOT / ".reference" / "TriMix"))
    parser.add_argument("--reference-wheels", default=str(ROOT / ".reference" / "wheels"))
    parser.add_argument("--reference-site", help="the pinned libraries already installed (pip --target) here")
    parser.add_argument("--reference-commit", help="the TriMix commit in --reference-code (default: git's)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--out", default=str(GOLDEN))
    parser.add_argument(
        "--margin-bound", type=float, default=1e-4,
        help="decision margins (nats) under this are near-ties, where trimix may differ (the test's bound)",
    )  # fmt: skip
    args = parser.parse_args()
    if os.environ.get("PYTHONHASHSEED") != "0":  # prompts.py's label order (a set's) must be reproducible
        os.execve(sys.executable, [sys.executable, *sys.argv], os.environ | {"PYTHONHASHSEED": "0"})
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    code = Path(args.reference_code)
    if not (code / "dexperts.py").is_file():
        raise SystemExit(f"no dexperts.py in {code}; fetch the reference as bench/reference_compare.py says")
    commit = reference_commit(code, args.reference_commit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        site = rc.reference_site(args, workdir)
        for name in args.cases:
            write(out / f"{name}.json", golden_case(name, CASES[name], site, workdir, args, commit))
    write(out / "paper_prompts.json", golden_prompts(args, commit))


if __name__ == "__main__":
    main()
