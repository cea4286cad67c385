"""lm-evaluation-harness backend: the real lm-eval entry points on tiny models, checked against lm-eval's
own ``hf`` model (which runs with this transformers) and against trimix's own likelihood."""

from __future__ import annotations

import json

# An extra that scripts/setup.sh installs: a broken install fails here, never skips.
import lm_eval
import pytest
import yaml
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

import trimix.lm_eval as backend
from conftest import FLOAT32_SUM_REL, trio_config
from trimix import FusedLM, load_config
from trimix.cli.main import main

LOGLIK = [
    ("Topic: science, travel, politics. Answer:", " sports"),
    ("ئۇيغۇر تىلى تۈركىي", " تىللار ئائىلىسىگە"),
    ("Hello world, this is ", "a small test"),
    ("", "The quick brown fox"),
]
TEXTS = [
    "Hello world, this is a small test of fused decoding.",
    "ئۇيغۇر تىلى تۈركىي تىللار ئائىلىسىگە مەنسۇپ.",
]
PROMPTS = ["Hello world, this is", "The quick brown", "ئۇيغۇر تىلى"]


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def single(make_model) -> tuple[FusedLM, str]:
    folder = make_model("llama", seed=9)
    raw = {"models": [{"model": str(folder), "role": "only"}], "fusion": {"method": "single", "role": "only"}}
    return FusedLM.from_config(load_config(raw)), str(folder)


# lm-eval's ``hf`` model is the reference, made precise with ``softmax_dtype="float64"``; trimix sums
# float32 log-softmax values: they agree to FLOAT32_SUM_REL (its derivation is in conftest).
@pytest.mark.parametrize("max_length", [None, 12])
def test_single_source_equals_lm_eval_hf(single, max_length) -> None:
    lm, folder = single
    ours = backend.TrimixLM(lm=lm, max_length=max_length, batch_size=2)
    # The same tokenizer object for both, so the comparison is of the scoring, not of tokenizer loading.
    hf = HFLM(
        pretrained=folder,
        tokenizer=lm.tokenizer,
        device="cpu",
        batch_size=2,
        dtype="float32",
        max_length=max_length,
        softmax_dtype="float64",
    )
    for a, b in zip(
        ours.loglikelihood(_requests("loglikelihood", LOGLIK)),
        hf.loglikelihood(_requests("loglikelihood", LOGLIK)),
        strict=True,
    ):
        assert a[0] == pytest.approx(b[0], rel=FLOAT32_SUM_REL) and a[1] == b[1]
    rolling = [(t,) for t in TEXTS]
    mine = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", rolling))
    theirs = hf.loglikelihood_rolling(_requests("loglikelihood_rolling", rolling))
    assert mine == pytest.approx(theirs, rel=FLOAT32_SUM_REL)
    if max_length is None:
        gen = [(p, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}) for p in PROMPTS]
        assert ours.generate_until(_requests("generate_until", gen)) == hf.generate_until(
            _requests("generate_until", gen)
        )


def test_trimix_through_lm_eval_equals_its_own_loglikelihood(trio) -> None:
    raw = trio_config(trio, method="trimix")
    raw["models"][0]["weight"], raw["models"][1]["weight"] = 0.3, 0.9
    lm = FusedLM.from_config(load_config(raw))
    via_lm_eval = backend.TrimixLM(lm=lm).loglikelihood(_requests("loglikelihood", LOGLIK))
    own = lm.loglikelihood(LOGLIK)
    assert [r[0] for r in via_lm_eval] == pytest.approx([r.logprob for r in own], rel=FLOAT32_SUM_REL)
    assert [r[1] for r in via_lm_eval] == [r.is_greedy for r in own]


def test_simple_evaluate_runs_trimix_tasks_offline(trio, tmp_path) -> None:
    """lm-eval's own pipeline scores what trimix's fused model says: each logged sample's accuracy is
    recomputed from ``FusedLM.loglikelihood`` at the same weights, and each generation from ``generate``."""
    from lm_eval.tasks import TaskManager

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(trio_config(trio)))
    manager = TaskManager(include_path=backend.tasks_dir(), include_defaults=False)
    loglik, gen = "trimix_sib200_topic_loglik_uig_Arab", "trimix_sib200_topic_gen_uig_Arab"
    out = lm_eval.simple_evaluate(
        model="trimix",
        model_args=f"config={config},weights=large:0.1|small_cpt:0.9|small_base:0",
        tasks=[loglik, gen],
        limit=3,
        task_manager=manager,
        log_samples=True,
    )
    raw = trio_config(trio, method="trimix")
    raw["models"][0]["weight"], raw["models"][1]["weight"] = 0.1, 0.9
    lm = FusedLM.from_config(load_config(raw))
    hits = []
    for sample in out["samples"][loglik]:
        scores = [r.logprob for r in lm.loglikelihood([tuple(a) for a in sample["arguments"]])]
        hits.append(float(max(range(len(scores)), key=scores.__getitem__) == sample["target"]))
        assert sample["acc"] == hits[-1]
    assert len(hits) == 3 and out["results"][loglik]["acc,none"] == pytest.approx(sum(hits) / 3)
    samples = out["samples"][gen]
    assert len(samples) == 3
    for sample in samples:
        context, settings = sample["arguments"][0]
        direct = backend.TrimixLM(lm=lm).generate_until(_requests("generate_until", [(context, settings)]))
        assert sample["resps"][0][0] == direct[0]
    matched = [s["exact_match"] for s in samples]
    assert out["results"][gen]["exact_match,none"] == pytest.approx(sum(matched) / 3)


def test_trimix_lm_eval_command_writes_results(trio, tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(trio_config(trio)))
    out = tmp_path / "results"
    code = main(
        [
            "lm-eval",
            "--model", "trimix",
            "--model_args", f"config={config}",
            "--tasks", "trimix_sib200_topic_loglik_uig_Arab",
            "--limit", "2",
            "--output_path", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    (written,) = list(out.rglob("results*.json"))
    assert "trimix_sib200_topic_loglik_uig_Arab" in json.loads(written.read_text())["results"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("config={c},pretrained=gpt2", "unknown trimix model_args \\['pretrained'\\]"),
        ("weights=large:0.1", "needs model_args config="),
        ("config={c},weights=large=0.1", "role:number pairs"),
        ("config={c},batch_size=abc", "batch_size must be a positive integer or 'auto'; got 'abc'"),
    ],
)
def test_bad_model_args_fail_clearly(trio, tmp_path, args, message) -> None:
    from trimix.errors import ConfigError

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(trio_config(trio)))
    with pytest.raises(ConfigError, match=message):
        backend.TrimixLM.create_from_arg_string(args.format(c=config))


def test_a_limited_run_samples_every_label() -> None:
    """The bundled files are sorted by label and lm-eval's --limit takes a prefix: the loader's fixed
    shuffle makes a 60-item prefix hold every label (sorted, it held 51 of one and 9 of another)."""
    import importlib.util

    from trimix.lm_eval import tasks_dir

    spec = importlib.util.spec_from_file_location("sib200_utils", f"{tasks_dir()}/utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    first = utils.load_sib200("uig_Arab")["test"]["category"][:60]
    again = utils.load_sib200("uig_Arab")["test"]["category"][:60]
    assert first == again and len(set(first)) == 7 and max(first.count(c) for c in set(first)) <= 20


def test_chat_template_of_the_chat_sources_or_a_clear_error(trio) -> None:
    """--apply_chat_template renders with the template of the sources that read chat; when those disagree,
    the error names them."""
    from trimix.errors import ConfigError

    raw = trio_config(trio, method="trimix")
    raw["models"][0]["weight"], raw["models"][1]["weight"] = 0.3, 0.9
    for model in raw["models"][:2]:
        model["prompt_format"] = "chat"
    lm = FusedLM.from_config(load_config(raw), load_all=True)
    large, small_cpt = (lm.pool.get(r).tokenizer for r in ("large", "small_cpt"))
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    large.chat_template = small_cpt.chat_template = template
    history = [{"role": "user", "content": "ئۇيغۇر تىلى"}]
    assert backend.TrimixLM(lm=lm).apply_chat_template(history) == "<user>ئۇيغۇر تىلى\n<assistant>"
    small_cpt.chat_template = template.replace("<assistant>", "Assistant:")
    with pytest.raises(ConfigError, match=r"\(large, small_cpt\) have different chat templates"):
        backend.TrimixLM(lm=lm).apply_chat_template(history)


def test_an_unknown_task_is_a_message(trio, tmp_path, capsys) -> None:
    """An unknown task: exit 2 with one message (lm-eval raised a ValueError with a traceback)."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(trio_config(trio)))
    args = ["lm-eval", "--model", "trimix", "--model_args", f"config={config}", "--tasks", "no_such_task_xyz"]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Tasks not found: no_such_task_xyz" in err and "Traceback" not in err
