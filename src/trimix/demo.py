"""``trimix demo``: the whole TriMix pipeline offline, on Gemma 3 270M and the bundled Uyghur data.

Only one pretrained model installs offline, so the three roles are built from it:

* ``small_base``: Gemma 3 270M (base), as shipped.
* ``small_cpt``: the same model with a LoRA continually pretrained on the bundled Uyghur corpus.
* ``large``: the same model with a LoRA trained on *English* SIB-200 topic-classification prompts with
  their answers, a stand-in for the paper's instruction-tuned large model: it carries task competence
  learned in a high-resource language, and no Uyghur labels. It is not larger, so the demo shows the
  mechanics and the decomposition (task skill from one source, language skill from another), not the
  paper's scale.

Adapters are cached by their settings, so a rerun only selects weights and evaluates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trimix.backends.loading import resolve_cache_dir
from trimix.config import CptConfig, SourceConfig, load_config
from trimix.data import UYGHUR_CORPUS
from trimix.evaluation import SELECTIONS, Evaluator, write_report
from trimix.runinfo import write_run_info
from trimix.tasks import get_task
from trimix.training import run_cpt, split_corpus

logger = logging.getLogger(__name__)

BASE_MODEL = "embedded:gemma-3-270m"
LANG = "uig_Arab"
VALIDATION_LINES = 60  # CPT's held-out Uyghur lines: the demo evaluates perplexity on the first ones
DEV_LINES = 12  # ... and selects TriMix weights for that task on the last ones


@dataclass(frozen=True)
class DemoBudget:
    """Every budget of the demo; ``scale`` multiplies them all (1.0 fits 15 minutes on 2 CPU cores)."""

    cpt_steps: int = 24
    instruct_steps: int = 18
    select_prompts: int = 6
    topic_items: int = 28
    topic_loglik_items: int = 28  # the same prompt, each label scored by its likelihood instead
    translation_items: int = 5
    heldout_lines: int = 40  # at most VALIDATION_LINES
    topic_shots: int = 0  # zero-shot: the task skill has to come from the `large` source
    translation_shots: int = 1  # one exemplar shows the output format

    def scaled(self, scale: float) -> DemoBudget:
        """Every count times ``scale`` (at least 1); the number of exemplars stays as it is."""
        grown = {
            name: max(1, math.ceil(getattr(self, name) * scale))
            for name in (
                "cpt_steps",
                "instruct_steps",
                "select_prompts",
                "topic_items",
                "topic_loglik_items",
                "translation_items",
                "heldout_lines",
            )
        }
        return replace(self, **grown)


def _train_or_reuse(
    name: str, role: str, cpt: CptConfig, cache_root: Path, progress: bool
) -> tuple[Path, dict]:
    """Train a LoRA on the base model with ``cpt``, or reuse the one cached for exactly these settings."""
    # Settings added since a cache was written are left out while unset, so existing adapters stay valid.
    settings = cpt.model_dump(exclude={"extend_vocab"} if cpt.extend_vocab is None else set())
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_root / "demo" / f"{name}-{key}"
    report_path = folder / "cpt_report.json"
    if report_path.is_file() and json.loads(report_path.read_text()).get("status") == "done":
        logger.info("reusing the %s adapter at %s", name, folder)
        return folder / "adapter", json.loads(report_path.read_text())
    report = run_cpt(SourceConfig(model=BASE_MODEL, role=role), cpt, folder, progress=progress)
    return folder / "adapter", report.to_dict()


def _lora_recipe(corpus: Path, steps: int, **settings: Any) -> CptConfig:
    """The demo's LoRA training settings, shared by both adapters; ``settings`` adds what differs."""
    return CptConfig(
        corpus=[str(corpus)],
        max_steps=steps,
        block_size=128,
        batch_size=4,
        save_every=max(steps, 1),
        learning_rate=4e-4,
        seed=0,
        **settings,
    )


def train_cpt_adapter(budget: DemoBudget, cache_root: Path, progress: bool) -> tuple[Path, dict]:
    """The Uyghur CPT LoRA (``small_cpt``), trained once per budget and cached."""
    logger.info("step 2/5: LoRA continual pretraining on Uyghur text (%d steps)", budget.cpt_steps)
    cpt = _lora_recipe(
        UYGHUR_CORPUS,
        budget.cpt_steps,
        max_validation_lines=VALIDATION_LINES,
        max_forgetting_lines=budget.heldout_lines,
    )
    return _train_or_reuse("cpt-uig", "small_base", cpt, cache_root, progress)


def train_instruct_adapter(budget: DemoBudget, cache_root: Path, progress: bool) -> tuple[Path, dict]:
    """The English task-instruction LoRA (``large``): English SIB-200 train prompts with their answers."""
    logger.info(
        "step 3/5: LoRA on English task prompts for the `large` role (%d steps)", budget.instruct_steps
    )
    task = get_task("sib200_topic", "eng_Latn", n_shots=budget.topic_shots)
    corpus = cache_root / "demo" / f"english_task_prompts_shots{budget.topic_shots}.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    with corpus.open("w", encoding="utf-8") as handle:
        for example in task.examples("train"):
            handle.write(
                json.dumps({"text": f"{task.render(example).text} {example.target}"}, ensure_ascii=False)
            )
            handle.write("\n")
    cpt = _lora_recipe(corpus, budget.instruct_steps, forgetting_text=None, max_validation_lines=20)
    return _train_or_reuse("instruct-eng", "large", cpt, cache_root, progress)


def demo_config(
    cpt_adapter: Path,
    instruct_adapter: Path,
    heldout: Path,
    heldout_dev: Path,
    budget: DemoBudget,
    base_model: str = BASE_MODEL,
    backend: str = "hf",
) -> dict:
    """The run config the demo evaluates: sources, search and the evaluation matrix (``backend``: every
    source's; ``llama_cpp`` runs the GGUF base and the adapters merged into it quantized)."""
    return {
        "models": [
            {"model": str(instruct_adapter), "role": "large", "weight": 0.1, "backend": backend},
            {"model": str(cpt_adapter), "role": "small_cpt", "weight": 0.9, "backend": backend},
            {"model": base_model, "role": "small_base", "backend": backend},
        ],
        "fusion": {"method": "trimix"},
        "search": {
            "task": "sib200_topic",
            "lang": LANG,
            "n_prompts": budget.select_prompts,
            "shots": budget.topic_shots,
            "refine_rounds": 1,
        },
        "eval": {
            "methods": [
                {"name": "small_base", "method": "single", "role": "small_base"},
                {"name": "small_cpt", "method": "single", "role": "small_cpt"},
                {"name": "large (eng-instruct)", "method": "single", "role": "large"},
                {"name": "proxy_tuning", "method": "proxy_tuning"},
                {
                    "name": "trimix (paper 0.1/0.9)",
                    "method": "trimix",
                    "weights": {"large": 0.1, "small_cpt": 0.9},
                },
                {
                    "name": "trimix (selected, prompt)",
                    "method": "trimix",
                    "select": True,
                    "select_score": "prompt",
                },
                {
                    "name": "trimix (selected, text)",
                    "method": "trimix",
                    "select": True,
                    "select_score": "input",
                },
            ],
            "tasks": [
                {
                    "task": "sib200_topic",
                    "langs": [LANG],
                    "limit": budget.topic_items,
                    "shots": budget.topic_shots,
                },
                {
                    "task": "sib200_topic",
                    "langs": [LANG],
                    "limit": budget.topic_loglik_items,
                    "shots": budget.topic_shots,
                    "scoring": "loglikelihood",
                },
                {
                    "task": "sib200_mt",
                    "langs": [LANG],
                    "limit": budget.translation_items,
                    "shots": budget.translation_shots,
                },
                {
                    "task": "text_ppl",
                    "langs": [LANG],
                    "options": {"path": str(heldout), "dev_path": str(heldout_dev)},
                },
            ],
            "batch_size": 8,
        },
    }


ROLES_NOTE = """Roles (only one pretrained model installs offline, so all three are built from Gemma 3 270M):
  small_base            Gemma 3 270M base, as shipped
  small_cpt             + LoRA continually pretrained on the bundled Uyghur corpus (UD_Uyghur-UDT)
  large (eng-instruct)  + LoRA trained on English SIB-200 topic prompts with answers: task skill learned in a
                        high-resource language, no Uyghur labels. It is not larger than the others, so this
                        shows the method's mechanics and decomposition, not the paper's scale.
Proxy Tuning = large + (small_cpt - small_base); TriMix weights are chosen on unlabeled Uyghur dev prompts."""


def run_demo(
    out_dir: Path,
    scale: float = 1.0,
    cache_dir: str | None = None,
    progress: bool = True,
    resumed: bool = False,
    backend: str = "hf",
) -> str:
    """Run the five steps and return the report table (also written under ``out_dir``); ``backend``
    decodes and scores steps 4-5 (training always runs on transformers)."""
    start = time.perf_counter()
    budget = DemoBudget().scaled(scale)
    cache_root = resolve_cache_dir(cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("step 1/5: Gemma 3 270M from the PyPI package (converted once, then cached)")
    cpt_adapter, cpt_report = train_cpt_adapter(budget, cache_root, progress)
    instruct_adapter, _ = train_instruct_adapter(budget, cache_root, progress)
    # Held-out Uyghur text: the CPT run's validation split (same seed), never trained on.
    split = split_corpus([str(UYGHUR_CORPUS)], "text", True, 0, 0.05, VALIDATION_LINES)
    # The first lines are evaluated; the last DEV_LINES pick TriMix weights for the perplexity task.
    heldout, heldout_dev = out_dir / "heldout_uig.txt", out_dir / "heldout_uig_dev.txt"
    evaluated = split.validation[: min(budget.heldout_lines, VALIDATION_LINES - DEV_LINES)]
    heldout.write_text("\n".join(evaluated) + "\n", encoding="utf-8")
    heldout_dev.write_text("\n".join(split.validation[-DEV_LINES:]) + "\n", encoding="utf-8")
    config = load_config(
        demo_config(cpt_adapter, instruct_adapter, heldout, heldout_dev, budget, backend=backend)
    )
    evaluator = Evaluator(config, out_dir, progress=progress)
    write_run_info(
        out_dir, config, config.eval.seed, resumed=resumed, demo_budget=budget.__dict__, scale=scale
    )
    logger.info(
        "steps 4-5/5: weight selection on Uyghur dev prompts, then evaluation of %d methods",
        len(config.eval.methods),
    )
    evaluator.run()
    table, _ = write_report(out_dir)
    selection = json.loads((out_dir / SELECTIONS / f"sib200_topic_{LANG}.json").read_text(encoding="utf-8"))
    split = selection["token_split"]
    modes = selection["by_mode"]
    lines = [
        ROLES_NOTE,
        "",
        f"CPT: {cpt_report['steps']} steps, {cpt_report['tokens_seen']:,} tokens; held-out Uyghur perplexity of the "
        f"small model {cpt_report['perplexity_before']['heldout_lrl']:.1f} -> {cpt_report['perplexity_after']['heldout_lrl']:.1f}",
        f"topic selection on {len(selection['prompt_ids'])} Uyghur dev prompts: {split['template'] + split['task_text']} "
        f"tokens, {split['template_share']:.0%} of them prompt template (English instruction and labels); scoring the "
        f"whole prompt selects {modes['prompt']['weights']}, scoring only the Uyghur text selects {modes['input']['weights']}",
        *[f"warning: {w}" for w in selection.get("warnings", [])],
        "",
        table,
        f"wall time {time.perf_counter() - start:.0f} s; everything is in {out_dir}",
    ]
    summary = "\n".join(lines)
    (out_dir / "demo_summary.md").write_text(summary + "\n", encoding="utf-8")
    return summary
