"""The demo's wiring on tiny models (fast) and the whole demo on the real Gemma 3 270M (slow)."""

from __future__ import annotations

import json

import pytest

from trimix.config import load_config
from trimix.demo import ROLES_NOTE, DemoBudget, demo_config
from trimix.evaluation import Evaluator, write_report


def test_budget_scales_every_count() -> None:
    base = DemoBudget()
    big = base.scaled(4)
    assert big.cpt_steps == 4 * base.cpt_steps and big.topic_items == 4 * base.topic_items
    assert DemoBudget().scaled(0.01).cpt_steps == 1  # never zero
    assert big.topic_shots == base.topic_shots  # exemplars are a protocol choice, not a budget


def test_demo_matrix_runs_end_to_end_on_tiny_models(trio, tmp_path) -> None:
    """The demo's own config (tiny models in place of Gemma and its adapters): selection on Uyghur dev
    prompts, then every method on generated and likelihood topic classification, translation and
    held-out perplexity."""
    heldout, dev = tmp_path / "heldout.txt", tmp_path / "dev.txt"
    heldout.write_text("ئۇيغۇر تىلى تۈركىي تىللار ئائىلىسىگە مەنسۇپ.\nبۈگۈن ھاۋا ناھايىتى ياخشى.\n")
    dev.write_text("مەكتەپتە ئوقۇغۇچىلار كىتاب ئوقۇدى.\n" * 3)
    budget = DemoBudget(
        select_prompts=2, topic_items=2, topic_loglik_items=2, translation_items=1, heldout_lines=2
    )
    raw = demo_config(
        trio["small_cpt"], trio["large"], heldout, dev, budget, base_model=str(trio["small_base"])
    )
    raw["generation"] = {"max_new_tokens": 4}
    config = load_config(raw)
    Evaluator(config, tmp_path, progress=False).run()
    _, cells = write_report(tmp_path)
    methods = {m.name for m in config.eval.methods}
    tasks = {
        "sib200_topic_uig_Arab",
        "sib200_topic_uig_Arab:loglik",
        "sib200_mt_uig_Arab-eng_Latn",
        "text_ppl_uig_Arab",
    }
    assert {(c["method"], c["task"]) for c in cells} == {(m, t) for m in methods for t in tasks}
    selected = json.loads((tmp_path / "selections" / "sib200_topic_uig_Arab.json").read_text())
    row = next(
        c for c in cells if c["method"] == "trimix (selected, text)" and c["task"] == "sib200_topic_uig_Arab"
    )
    assert row["weights"] == selected["by_mode"]["input"]["weights"]
    assert all(role in ROLES_NOTE for role in ("small_base", "small_cpt", "large"))


@pytest.mark.slow
def test_demo_end_to_end(tmp_path) -> None:
    from trimix.demo import run_demo

    summary = run_demo(tmp_path / "demo", scale=0.25, progress=False)  # shares the conversion cache
    assert "trimix (selected, text)" in summary and (tmp_path / "demo" / "report.png").is_file()
