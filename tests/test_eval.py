"""The evaluation harness: task readers on MiLiC-Eval-shaped fixtures, an end-to-end matrix, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import FLOAT32_SUM_REL, MILIC, UG, assert_same_rows, row_key, trio_config
from trimix.cli.main import main
from trimix.config import load_config
from trimix.errors import DataError
from trimix.evaluation import Evaluator, read_predictions, write_report
from trimix.tasks import get_task


@pytest.mark.parametrize(
    ("task", "options"),
    [
        ("milic_reading_comprehension", {}),
        ("milic_response_selection", {}),
        ("milic_text_classification", {}),
        ("milic_title_generation", {}),
        ("milic_math", {}),
        ("milic_translation", {"target": "en"}),
        ("milic_translation", {"source": "zh", "target": "ug"}),
    ],
)
@pytest.mark.parametrize("style", ["paper", "compact"])
def test_milic_readers_and_prompts(milic_root, task: str, options: dict, style: str) -> None:
    t = get_task(task, "ug", root=str(milic_root), prompt_style=style, **options)
    items = t.examples("test")
    assert len(items) == 4
    prompt = t.render(items[0])
    first_line = t.paper_instruction() if style == "paper" else t.instruction()
    assert prompt.text.startswith(first_line + "\n")
    # Ends at the answer label (the paper's English prompts keep a space after some): never the answer.
    assert prompt.text.rstrip()[-1] in ":："
    # The task's own text lies in the recorded spans, the template around them.
    own = "".join(prompt.text[a:b] for a, b in prompt.spans)
    block = prompt.text[prompt.input_start :]
    first_field = next(iter(items[0].fields.values()))
    first_field = first_field if isinstance(first_field, str) else str(first_field)
    assert first_field[:8] in own and first_field[:8] in block
    zh_task = get_task(task, "ug", root=str(milic_root), prompt_lang="zh", prompt_style=style, **options)
    zh = zh_task.render(items[0])
    assert zh.text.startswith(zh_task.paper_instruction() if style == "paper" else zh_task.instruction())
    assert zh.text[-1] == "：" and first_field[:8] in "".join(zh.text[a:b] for a, b in zh.spans)
    assert t.generation_settings()["prompt_style"] == style  # recorded with every prediction


def test_milic_scoring_rules(milic_root) -> None:
    rc = get_task("milic_reading_comprehension", "ug", root=str(milic_root))
    assert rc.extract(" b. because\nmore") == "B" and rc.extract("none") == ""
    math = get_task("milic_math", "ug", root=str(milic_root))
    example = math.examples("test")[1]
    assert math.is_correct(math.extract(" so 1 + 2 = 3, answer 3."), example)
    classes = get_task("milic_text_classification", "ug", root=str(milic_root), prompt_lang="zh")
    assert classes.examples("test")[0].target == "体育" and set(classes.examples("test")[0].choices) == {
        "体育",
        "健康",
    }


@pytest.mark.parametrize(
    ("folder", "mutate", "message"),
    [
        (
            "reading_comprehension",
            lambda x: x[1].pop("question"),
            r"test.json: item 2 \(id rc1\): missing field 'question'",
        ),
        ("reading_comprehension", lambda x: x[0].update(answer="F"), "field 'answer' must be a letter A-D"),
        ("text_classification", lambda x: x[2].update(text=""), "item 3 .*field 'text' must be a non-empty"),
        ("text_classification", lambda x: x[0].update(label={"en": "sports"}), "has no 'zh' entry"),
        ("math", lambda x: x[0].update(answer="many"), "field 'answer' must be a number"),
    ],
)
def test_malformed_milic_rows_are_named(tmp_path, folder: str, mutate, message: str) -> None:
    items = json.loads(json.dumps(MILIC[folder]))
    mutate(items)
    (tmp_path / folder / "ug").mkdir(parents=True)
    for name in ("test", "dev", "train_1"):
        (tmp_path / folder / "ug" / f"{name}.json").write_text(json.dumps(items, ensure_ascii=False))
    name = {
        "reading_comprehension": "milic_reading_comprehension",
        "text_classification": "milic_text_classification",
        "math": "milic_math",
    }[folder]
    with pytest.raises(DataError, match=message):
        get_task(name, "ug", root=str(tmp_path), prompt_lang="zh").examples("test")


def test_label_outside_label_set_is_rejected(tmp_path, milic_root) -> None:
    folder = tmp_path / "text_classification" / "ug"
    folder.mkdir(parents=True)
    (folder / "test.json").write_text(json.dumps(MILIC["text_classification"], ensure_ascii=False))
    dev = json.loads(json.dumps(MILIC["text_classification"]))
    dev[1]["label"] = {"en": "weather", "zh": "天气"}
    (folder / "dev.json").write_text(json.dumps(dev, ensure_ascii=False))
    with pytest.raises(
        DataError, match=r"dev.json: item id tc1 has label 'weather', not in the test file's label set"
    ):
        get_task("milic_text_classification", "ug", root=str(tmp_path)).examples("dev")


def test_belebele_reader(tmp_path) -> None:
    rows = [
        {
            "flores_passage": UG[i % 3],
            "question": "Q?",
            "mc_answer1": "a",
            "mc_answer2": "b",
            "mc_answer3": "c",
            "mc_answer4": "d",
            "correct_answer_num": str(1 + i % 4),
        }
        for i in range(6)
    ]
    path = tmp_path / "uig_Arab.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    task = get_task("belebele", "uig_Arab", path=str(path), n_shots=2)
    items = task.examples("test")
    assert len(items) == 4 and not {e.id for e in items} & {e.id for e in task.shots()}
    rows[3]["correct_answer_num"] = "7"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    with pytest.raises(DataError, match="item 4: field 'correct_answer_num' must be 1-4"):
        get_task("belebele", "uig_Arab", path=str(path)).examples("test")


def _eval_config(trio, milic_root, tmp_path, methods=None, tasks=None) -> dict:
    text = tmp_path / "heldout.txt"
    text.write_text("\n".join(UG) + "\n", encoding="utf-8")
    raw = trio_config(trio)
    raw["search"] = {"n_prompts": 2, "refine_rounds": 1}
    raw["eval"] = {
        "methods": methods
        or [
            {"name": "large", "method": "single", "role": "large"},
            {"name": "proxy_tuning", "method": "proxy_tuning"},
            {"name": "trimix", "method": "trimix", "weights": {"large": 0.1, "small_cpt": 0.9}},
        ],
        "tasks": tasks
        or [
            {"task": "sib200_topic", "langs": ["uig_Arab"], "limit": 3, "shots": 1},
            {"task": "sib200_mt", "langs": ["uig_Arab"], "limit": 2, "shots": 1},
            {
                "task": "milic_reading_comprehension",
                "langs": ["ug"],
                "options": {"root": str(milic_root)},
                "limit": 2,
            },
            {"task": "text_ppl", "langs": ["uig_Arab"], "options": {"path": str(text)}},
        ],
        "batch_size": 2,
    }
    return raw


def test_end_to_end_matrix_and_report(trio, milic_root, tmp_path, capsys) -> None:
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(_eval_config(trio, milic_root, tmp_path)))
    out = tmp_path / "run"
    assert main(["eval", "-c", str(path), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = read_predictions(out / "predictions.jsonl")
    assert len(rows) == 3 * (3 + 2 + 2 + 3)
    assert {r["method"] for r in rows} == {"large", "proxy_tuning", "trimix"}
    for name in ("report.md", "report.json", "report.png", "config.yaml", "run.json"):
        assert (out / name).is_file()
    cells = json.loads((out / "report.json").read_text())["cells"]
    mt = next(c for c in cells if c["task"] == "sib200_mt_uig_Arab-eng_Latn" and c["method"] == "trimix")
    assert set(mt["scores"]) == {"chrf_pp", "bleu"} and mt["weights"]["small_base"] == pytest.approx(0.0)
    ppl = next(c for c in cells if c["task"] == "text_ppl_uig_Arab" and c["method"] == "large")
    assert ppl["scores"]["perplexity"] > 1
    assert "| proxy_tuning |" in printed
    # `trimix report` rebuilds the same table from the JSONL alone.
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == (out / "report.md").read_text().strip()
    # `--against`: another run of the same evaluation (here a copy holding fewer of large's rows), cell by
    # cell on the items both scored: run minus base with paired intervals.
    base = tmp_path / "base"
    base.mkdir()
    lines = (out / "predictions.jsonl").read_text().splitlines()
    dropped = next(i for i, line in enumerate(lines) if json.loads(line)["method"] == "large")
    (base / "predictions.jsonl").write_text("\n".join(lines[:dropped] + lines[dropped + 1 :]) + "\n")
    assert main(["report", str(out), "--against", str(base)]) == 0
    comparison = (out / "against-base.md").read_text()
    assert comparison.strip() in capsys.readouterr().out
    table = [
        line.split(" | ") for line in comparison.splitlines() if line.startswith("| ") and "---" not in line
    ]
    rows_by_cell = {(r[0].strip("| "), r[1], r[3]): r for r in table[1:]}
    assert len(rows_by_cell) == len(table) - 1 > 0
    for (method, task, _), row in rows_by_cell.items():
        assert row[5] == row[6] and row[7].startswith("0.00")  # the same predictions: no difference
        full = sum(1 for r in rows if r["method"] == method and r["task"] == task)
        assert int(row[4]) == full - (method == "large" and task == json.loads(lines[dropped])["task"])
    assert main(["report", str(out), "--against", str(tmp_path / "missing")]) == 2
    assert "missing/predictions.jsonl does not exist" in capsys.readouterr().err


def test_loglikelihood_scoring_and_selected_weights(trio, milic_root, tmp_path) -> None:
    raw = _eval_config(
        trio,
        milic_root,
        tmp_path,
        methods=[{"name": "trimix_select", "method": "trimix", "select": True}],
        tasks=[
            {
                "task": "sib200_topic",
                "langs": ["uig_Arab"],
                "limit": 2,
                "shots": 1,
                "scoring": "loglikelihood",
            },
            {"task": "sib200_topic", "langs": ["uig_Arab"], "limit": 2, "shots": 1},  # the same, generated
        ],
    )
    out = tmp_path / "run"
    out.mkdir()
    Evaluator(load_config(raw), out, progress=False).run()
    everything = read_predictions(out / "predictions.jsonl")
    assert (
        sorted(r["task"] for r in everything)
        == ["sib200_topic_uig_Arab"] * 2 + ["sib200_topic_uig_Arab:loglik"] * 2
    )
    _, cells = write_report(out)
    assert {c["task"] for c in cells} == {"sib200_topic_uig_Arab", "sib200_topic_uig_Arab:loglik"}
    rows = [r for r in everything if r["task"].endswith(":loglik")]
    assert len(rows) == 2 and all(len(r["choice_nll"]) == 7 for r in rows)
    assert all(r["prediction"] == min(r["choice_nll"], key=r["choice_nll"].get) for r in rows)
    selection = json.loads((out / "selections" / "sib200_topic_uig_Arab.json").read_text())
    assert rows[0]["weights"] == selection["selected"]["weights"]
    assert selection["prompts"]["split"] == "dev"


def test_scored_cells_share_forwards_and_match_each_method_alone(trio, milic_root, tmp_path) -> None:
    """Log-likelihood and perplexity cells score every method from one forward pass per source; the
    numbers must equal a run of each method on its own (which fuses only that method's sources)."""
    methods = [
        {"name": "small_base", "method": "single", "role": "small_base"},
        {"name": "proxy_tuning", "method": "proxy_tuning"},
        {"name": "trimix", "method": "trimix", "weights": {"large": 0.3, "small_cpt": 0.9}},
    ]
    tasks = [
        {"task": "sib200_topic", "langs": ["uig_Arab"], "limit": 2, "shots": 1, "scoring": "loglikelihood"},
        {"task": "text_ppl", "langs": ["uig_Arab"], "options": {"path": str(tmp_path / "heldout.txt")}},
    ]
    together = tmp_path / "together"
    together.mkdir()
    Evaluator(
        load_config(_eval_config(trio, milic_root, tmp_path, methods, tasks)), together, progress=False
    ).run()
    shared = {(r["method"], r["task"], r["id"]): r for r in read_predictions(together / "predictions.jsonl")}
    assert len(shared) == 3 * (2 + 3)
    for method in methods:
        alone = tmp_path / method["name"]
        alone.mkdir()
        raw = _eval_config(trio, milic_root, tmp_path, [method], tasks)
        Evaluator(load_config(raw), alone, progress=False).run()
        for row in read_predictions(alone / "predictions.jsonl"):
            other = shared[(row["method"], row["task"], row["id"])]
            if "nll" in row:
                assert other["nll"] == pytest.approx(row["nll"], rel=FLOAT32_SUM_REL)
                assert other["n_tokens"] == row["n_tokens"]
            else:
                assert other["choice_nll"] == pytest.approx(row["choice_nll"], rel=FLOAT32_SUM_REL)
                assert other["prediction"] == row["prediction"]


def test_plausibility_on_a_scored_task_is_named_in_a_warning(trio, milic_root, tmp_path, caplog) -> None:
    method = {
        "name": "trimix_plaus",
        "method": "trimix",
        "weights": {"large": 0.1, "small_cpt": 0.9},
        "plausibility": {"role": "large", "alpha": 0.1},
    }
    tasks = [{"task": "text_ppl", "langs": ["uig_Arab"], "options": {"path": str(tmp_path / "heldout.txt")}}]
    out = tmp_path / "run"
    out.mkdir()
    with caplog.at_level("WARNING", logger="trimix.evaluation.runner"):
        Evaluator(
            load_config(_eval_config(trio, milic_root, tmp_path, [method], tasks)), out, progress=False
        ).run()
    assert "'trimix_plaus': the plausibility constraint applies to generation only" in caplog.text
    assert len(read_predictions(out / "predictions.jsonl")) == 3


def _one_trimix_cell(trio, milic_root, tmp_path) -> tuple[dict, dict, Path, Path]:
    """An eval config with one TriMix method (0.1/0.9) on held-out perplexity, written to ``eval.yaml``;
    returns the raw config, its method (edit it, then rewrite the file), the file and the output folder."""
    tasks = [{"task": "text_ppl", "langs": ["uig_Arab"], "options": {"path": str(tmp_path / "heldout.txt")}}]
    method = {"name": "trimix", "method": "trimix", "weights": {"large": 0.1, "small_cpt": 0.9}}
    raw = _eval_config(trio, milic_root, tmp_path, [method], tasks)
    path, out = tmp_path / "eval.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(raw))
    return raw, method, path, out


def test_overwrite_starts_afresh_and_resume_continues(trio, milic_root, tmp_path) -> None:
    raw, method, path, out = _one_trimix_cell(trio, milic_root, tmp_path)
    assert main(["-q", "eval", "-c", str(path), "-o", str(out)]) == 0
    first = read_predictions(out / "predictions.jsonl")
    assert main(["-q", "eval", "-c", str(path), "-o", str(out)]) == 2  # not empty: refused, nothing touched
    assert read_predictions(out / "predictions.jsonl") == first
    method["weights"] = {"large": 0.5, "small_cpt": 0.5}
    path.write_text(yaml.safe_dump(raw))
    assert main(["-q", "eval", "-c", str(path), "-o", str(out), "--overwrite"]) == 0
    fresh = read_predictions(out / "predictions.jsonl")
    assert len(fresh) == len(first) and all(r["weights"]["large"] == 0.5 for r in fresh)
    assert main(["-q", "eval", "-c", str(path), "-o", str(out), "--resume"]) == 0  # all done: nothing added
    assert read_predictions(out / "predictions.jsonl") == fresh


def _killed_at(point: str, monkeypatch, run) -> None:
    """Run ``run`` with the process 'dying' at fault point ``point`` (see trimix.faults)."""
    from trimix import faults

    faults.reset()
    monkeypatch.setenv(faults.ENV, point)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.delenv(faults.ENV)
    faults.reset()


def test_resume_after_kill_loses_and_duplicates_nothing(trio, milic_root, tmp_path, monkeypatch) -> None:
    raw = _eval_config(trio, milic_root, tmp_path)
    clean = tmp_path / "clean"
    clean.mkdir()
    Evaluator(load_config(raw), clean, progress=False).run()
    _, expected = write_report(clean)

    killed = tmp_path / "killed"
    killed.mkdir()
    # The process dies in the middle of writing the 4th row: half a line is on disk.
    _killed_at("eval.row:4", monkeypatch, lambda: Evaluator(load_config(raw), killed, progress=False).run())
    assert not (killed / "predictions.jsonl").read_bytes().endswith(b"\n")
    assert len(read_predictions(killed / "predictions.jsonl")) == 3  # the torn line is dropped
    Evaluator(load_config(raw), killed, progress=False).run()
    rows = read_predictions(killed / "predictions.jsonl")
    keys = [(r["method"], r["task"], r["id"]) for r in rows]
    assert len(keys) == len(set(keys)) == 30
    _, resumed = write_report(killed)
    # The resumed run batches the remaining items differently: scores agree to float32 precision.
    assert_same_rows(
        sorted(resumed, key=lambda c: (c["method"], c["task"])),
        sorted(expected, key=lambda c: (c["method"], c["task"])),
    )


def test_resume_refuses_changed_cells_and_reruns_them_when_asked(trio, milic_root, tmp_path, capsys) -> None:
    raw, method, path, out = _one_trimix_cell(trio, milic_root, tmp_path)
    assert main(["-q", "eval", "-c", str(path), "-o", str(out)]) == 0
    first = read_predictions(out / "predictions.jsonl")
    config_before = (out / "config.yaml").read_text()
    method["weights"] = {"large": 0.5, "small_cpt": 0.5}
    path.write_text(yaml.safe_dump(raw))
    assert main(["-q", "eval", "-c", str(path), "-o", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "trimix on text_ppl_uig_Arab: weights.large: 0.1 -> 0.5; weights.small_cpt: 0.9 -> 0.5" in err
    assert "--rerun-changed" in err
    assert read_predictions(out / "predictions.jsonl") == first  # nothing mixed, nothing touched
    assert (out / "config.yaml").read_text() == config_before
    assert main(["-q", "eval", "-c", str(path), "-o", str(out), "--resume", "--rerun-changed"]) == 0
    redone = read_predictions(out / "predictions.jsonl")
    assert len(redone) == len(first) and all(r["weights"]["large"] == 0.5 for r in redone)


def test_resume_accepts_work_recorded_before_a_setting_existed(trio, milic_root, tmp_path, capsys) -> None:
    """A run folder written before a setting was added (here ``search.average``) resumes when the setting
    is at the value that does what older trimix did; any other value is a change, named as such."""
    from trimix.runinfo import fingerprint

    tasks = [
        {"task": "sib200_topic", "langs": ["uig_Arab"], "limit": 2, "shots": 1, "scoring": "loglikelihood"}
    ]
    methods = [{"name": "trimix_select", "method": "trimix", "select": True}]
    raw = _eval_config(trio, milic_root, tmp_path, methods=methods, tasks=tasks)
    path, out = tmp_path / "eval.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(raw))
    assert main(["-q", "eval", "-c", str(path), "-o", str(out)]) == 0
    # Rewrite the folder as the trimix before `search.average` wrote it.
    cells = json.loads((out / "cells.json").read_text())
    ((new_cell, description),) = cells.items()
    del description["search"]["average"]
    old_cell = fingerprint(description)
    (out / "cells.json").write_text(json.dumps({old_cell: description}))
    rows = [r | {"cell": old_cell} for r in read_predictions(out / "predictions.jsonl")]
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert old_cell != new_cell
    assert main(["-q", "eval", "-c", str(path), "-o", str(out), "--resume"]) == 0
    assert read_predictions(out / "predictions.jsonl") == rows  # accepted as done: nothing redone
    raw["search"]["average"] = "texts"
    path.write_text(yaml.safe_dump(raw))
    assert main(["-q", "eval", "-c", str(path), "-o", str(out), "--resume"]) == 2
    assert 'search.average: "tokens" -> "texts"' in capsys.readouterr().err


def test_resume_refuses_a_folder_without_fingerprints(trio, milic_root, tmp_path, capsys) -> None:
    tasks = [{"task": "text_ppl", "langs": ["uig_Arab"], "options": {"path": str(tmp_path / "heldout.txt")}}]
    raw = _eval_config(trio, milic_root, tmp_path, tasks=tasks)
    path, out = tmp_path / "eval.yaml", tmp_path / "old"
    path.write_text(yaml.safe_dump(raw))
    out.mkdir()
    (out / "predictions.jsonl").write_text(
        json.dumps({"method": "large", "task": "text_ppl_uig_Arab", "id": "line1"}) + "\n"
    )
    assert main(["-q", "eval", "-c", str(path), "-o", str(out), "--resume"]) == 2
    assert "without run fingerprints" in capsys.readouterr().err


def test_one_folder_one_run(tmp_path) -> None:
    import os
    import subprocess
    import sys

    from trimix.errors import ConfigError
    from trimix.runinfo import LOCK, folder_lock

    with (
        folder_lock(tmp_path),
        pytest.raises(ConfigError, match=r"in use by another trimix run \(process"),
        folder_lock(tmp_path),
    ):
        pass
    assert not (tmp_path / LOCK).exists()  # released
    # A lock left by a process that is gone is taken over.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    import socket

    (tmp_path / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with folder_lock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


def test_text_perplexity_never_selects_on_evaluated_lines(tmp_path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("one\ntwo\n")
    with pytest.raises(DataError, match=r"no dev split: give options.dev_path"):
        get_task("text_ppl", "uig_Arab", path=str(text)).examples("dev")
    dev = tmp_path / "d.txt"
    dev.write_text("three\n")
    task = get_task("text_ppl", "uig_Arab", path=str(text), dev_path=str(dev))
    assert [e.fields["text"] for e in task.examples("dev")] == ["three"]
    assert [e.fields["text"] for e in task.examples("test")] == ["one", "two"]


def test_eval_errors(trio, milic_root, tmp_path, capsys) -> None:
    raw = _eval_config(trio, milic_root, tmp_path, tasks=[{"task": "sib200_topc", "langs": ["uig_Arab"]}])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["eval", "-c", str(path), "-o", str(tmp_path / "o")]) == 2
    assert "Did you mean 'sib200_topic'" in capsys.readouterr().err
    raw = _eval_config(
        trio, milic_root, tmp_path, methods=[{"name": "x", "method": "trimix", "weights": {"lrage": 0.1}}]
    )
    path.write_text(yaml.safe_dump(raw))
    assert main(["eval", "-c", str(path), "-o", str(tmp_path / "o2")]) == 2
    assert "unknown role(s) ['lrage']" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2


@pytest.mark.slow
def test_random_kills_then_resume_equal_an_uninterrupted_run(trio, milic_root, tmp_path) -> None:
    """`trimix eval` as a real process, SIGKILLed at seeded random moments (loading, decoding, writing:
    wherever it is), then resumed: the rows equal an uninterrupted run's, none lost or duplicated."""
    import random
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(_eval_config(trio, milic_root, tmp_path)))

    def command(out: Path, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "trimix.cli.main",
            "-q",
            "eval",
            "-c",
            str(path),
            "-o",
            str(out),
            *extra,
        ]

    def rows(out: Path) -> list[dict]:
        return sorted(read_predictions(out / "predictions.jsonl"), key=row_key)

    start = time.perf_counter()
    subprocess.run(command(tmp_path / "clean"), check=True, capture_output=True)
    duration = time.perf_counter() - start
    rng = random.Random(0)
    for attempt in range(3):
        out = tmp_path / f"killed{attempt}"
        process = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 0.95) * duration)
        process.send_signal(signal.SIGKILL)
        process.wait()
        resumed = subprocess.run(command(out, "--resume"), capture_output=True, text=True)
        if not out.exists():  # killed while starting, before it made anything: --resume says so, a rerun goes
            assert resumed.returncode == 2 and "nothing to continue" in resumed.stderr, resumed.stderr
            resumed = subprocess.run(command(out), capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        assert_same_rows(rows(out), rows(tmp_path / "clean"))  # resumed batches differ: float32 precision
