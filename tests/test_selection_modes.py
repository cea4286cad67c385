"""Selection says what it measured: a trio built so that the prompt template and the task's own text
favour different weights makes the two scoring modes disagree, and the selection reports both."""

from __future__ import annotations

import pytest

from trimix import FusedLM
from trimix.config import CptConfig, SearchConfig, SourceConfig, load_config
from trimix.data import read_sib200
from trimix.search import search_weights, selection_texts
from trimix.tasks import get_task
from trimix.testing import build_tokenizer, save_tiny_model
from trimix.training import run_cpt


@pytest.fixture(scope="module")
def template_vs_language_trio(tmp_path_factory) -> FusedLM:
    """``large`` fully trained on the English template of the prompts, ``small_cpt`` on Uyghur text."""
    root = tmp_path_factory.mktemp("modes")
    base = save_tiny_model(root / "base", "qwen2", build_tokenizer(), seed=3)
    task = get_task("sib200_topic", "uig_Arab", n_shots=0)
    english = root / "template.txt"
    english.write_text("\n".join(f"{task.instruction()} Text: {i} Topic:" for i in range(60)))
    uyghur = root / "uyghur.txt"
    uyghur.write_text("\n".join(r.text for r in read_sib200("uig_Arab", "train")[:120]))

    def train(corpus, out):
        settings = dict(method="full", block_size=32, batch_size=4, max_steps=30, learning_rate=3e-3)
        cpt = CptConfig(
            corpus=[str(corpus)], warmup_ratio=0.0, forgetting_text=None, save_every=1000, **settings
        )
        run_cpt(SourceConfig(model=str(base), role="small_base"), cpt, out, progress=False)
        return str(out / "model")

    models = [
        {"model": train(english, root / "large"), "role": "large"},
        {"model": train(uyghur, root / "cpt"), "role": "small_cpt"},
        {"model": str(base), "role": "small_base"},
    ]
    return FusedLM.from_config(
        load_config({"models": models, "fusion": {"method": "proxy_tuning"}}), load_all=True
    )


def test_template_heavy_prompts_and_the_task_text_select_differently(
    template_vs_language_trio, caplog
) -> None:
    lm = template_vs_language_trio
    search = SearchConfig(task="sib200_topic", lang="uig_Arab", n_prompts=6, shots=0, refine_rounds=1)
    texts, origin = selection_texts(search)
    scorer = lm.scorer(texts, roles=["large", "small_cpt", "small_base"], progress=False)
    with caplog.at_level("WARNING", logger="trimix.search.select"):
        result = search_weights(scorer, search, origin)
    prompt, text = result.by_mode["prompt"]["weights"], result.by_mode["input"]["weights"]
    assert prompt["large"] > text["large"] + 0.2  # the English-template source wins only on the template
    assert result.warnings and "more than one grid step apart" in caplog.text
    assert 0.2 < result.token_split["template_share"] < 0.8
    assert "ARABIC" in result.token_split["task_text_by_script"]
    # The same forward passes, scored the other way, select the other point.
    other = search_weights(scorer, search.model_copy(update={"score": "input"}), origin)
    assert other.selected.weights == pytest.approx(text)
