"""`trimix generate` end to end on tiny models, in-process and through the installed entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import trio_config
from trimix import FusedLM, load_config
from trimix.cli.main import main


@pytest.fixture(scope="module")
def lm(trio) -> FusedLM:
    """The fused model of ``config_file``, for decoding directly what the CLI should have decoded."""
    return FusedLM.from_config(load_config(trio_config(trio)), load_all=True)


@pytest.fixture
def config_file(trio, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(trio_config(trio)))
    return path


def test_generate_writes_jsonl_and_resolved_config(lm, config_file, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "generate",
            "-c",
            str(config_file),
            "-p",
            "Hello",
            "-p",
            "ئۇيغۇر",
            "--max-new-tokens",
            "4",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["id"] for x in lines] == [0, 1]
    direct = lm.generate(["Hello", "ئۇيغۇر"], max_new_tokens=4)  # the config's fusion, decoded directly
    assert [(x["prompt"], x["token_ids"], x["text"]) for x in lines] == [
        (g.prompt, g.token_ids, g.text) for g in direct
    ]
    saved = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert saved == lines
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert [m["weight"] for m in resolved["models"]] == [1.0, 1.0, -1.0]
    assert json.loads((out / "run.json").read_text())["seed"] == 0


def test_generate_from_jsonl_with_weights_override(lm, config_file, tmp_path, capsys) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Hello"}\n{"id": "b", "prompt": "The"}\n')
    code = main(
        [
            "generate",
            "-c",
            str(config_file),
            "-f",
            str(prompts),
            "--weights",
            "large=0.1,small_cpt=0.9,small_base=0",
            "--max-new-tokens",
            "3",
            "--inspect",
            "2",
            "-o",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["id"] for x in lines] == ["a", "b"]
    assert set(lines[0]["inspection"][0]["sources"]) == {"large", "small_cpt"}  # small_base has weight 0
    # The override is what was recorded and what decoded: a direct fused decode at 0.1 / 0.9 / 0, which
    # differs from the decode at the config's own weights (Proxy Tuning's 1, 1, -1).
    recorded = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["models"]
    weights = {"large": 0.1, "small_cpt": 0.9, "small_base": 0.0}
    assert {m["role"]: m["weight"] for m in recorded} == weights
    direct = lm.with_weights(method="weighted", **weights).generate(["Hello", "The"], max_new_tokens=3)
    assert [x["token_ids"] for x in lines] == [g.token_ids for g in direct]
    assert [x["token_ids"] for x in lines] != [
        g.token_ids for g in lm.generate(["Hello", "The"], max_new_tokens=3)
    ]


def test_generate_reads_stdin_through_entry_point(lm, config_file) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trimix.cli.main",
            "-q",
            "generate",
            "-c",
            str(config_file),
            "--max-new-tokens",
            "2",
        ],
        input="Hello\nThe quick\n",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.strip().splitlines()]
    direct = lm.generate(["Hello", "The quick"], max_new_tokens=2)
    assert [(x["prompt"], x["token_ids"]) for x in lines] == [(g.prompt, g.token_ids) for g in direct]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"fusion": {"method": "proxy_tuning", "plausibility": {"role": "none"}}},
            "plausibility.role` must be one of",
        ),
        ({"fusion": {"method": "weighted"}}, "needs a `weight` on every source"),
    ],
)
def test_bad_config_exits_2_with_message(trio, tmp_path, capsys, change, message) -> None:
    raw = {**trio_config(trio), **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["generate", "-c", str(path), "-p", "x"]) == 2
    assert message in capsys.readouterr().err


def test_bad_inputs_exit_2(config_file, tmp_path, capsys) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    assert main(["generate", "-c", str(config_file), "-f", str(bad)]) == 2
    assert "p.jsonl:2" in capsys.readouterr().err
    assert main(["generate", "-c", str(config_file), "-p", "x", "--weights", "large=abc"]) == 2
    assert main(["generate", "-c", str(tmp_path / "missing.yaml"), "-p", "x"]) == 2
    nan = tmp_path / "nan.yaml"
    nan.write_text(config_file.read_text().replace("method: proxy_tuning", "method: weighted"))
    assert (
        main(["generate", "-c", str(nan), "-p", "x", "--weights", "large=nan,small_cpt=1,small_base=0"]) == 2
    )
    assert "finite" in capsys.readouterr().err
    out = tmp_path / "full"
    out.mkdir()
    (out / "x").write_text("keep me")
    assert main(["generate", "-c", str(config_file), "-p", "x", "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "x").read_text() == "keep me"


def test_ls_lists_what_errors_point_to(capsys) -> None:
    assert main(["ls", "tasks"]) == 0
    listed = capsys.readouterr().out
    assert "sib200_topic" in listed and "milic_title_generation" in listed and "belebele" in listed
    assert main(["ls", "models"]) == 0
    assert "embedded:gemma-3-270m" in capsys.readouterr().out


def test_killed_generation_resumes_to_the_uninterrupted_result(
    config_file, tmp_path, capsys, monkeypatch
) -> None:
    from trimix import faults

    prompts = tmp_path / "p.txt"
    prompts.write_text(
        "\n".join(["Hello world", "The", "ئۇيغۇر تىلى", "Numbers 0 1", "Translate", "A B C"]) + "\n"
    )
    common = [
        "generate",
        "-c",
        str(config_file),
        "-f",
        str(prompts),
        "--max-new-tokens",
        "5",
        "--batch-size",
        "2",
    ]
    sampled = ["--do-sample", "--temperature", "1.5", "--seed", "7"]
    assert main(["-q", *common, *sampled, "-o", str(tmp_path / "whole")]) == 0
    whole = (tmp_path / "whole" / "generations.jsonl").read_text().splitlines()
    faults.reset()
    monkeypatch.setenv(faults.ENV, "generate.row:3")  # dies while writing the second batch
    assert main(["-q", *common, *sampled, "-o", str(tmp_path / "cut")]) == 130
    assert "--resume to continue" in capsys.readouterr().err
    monkeypatch.delenv(faults.ENV)
    kept = (tmp_path / "cut" / "generations.jsonl").read_text()
    assert kept.count("\n") == 2 and not kept.endswith("\n")  # one batch durable, a torn line after it
    assert main(["-q", *common, *sampled, "-o", str(tmp_path / "cut"), "--resume"]) == 0
    assert (tmp_path / "cut" / "generations.jsonl").read_text().splitlines() == whole
    # Other settings on --resume are refused, naming the change.
    assert main(["-q", *common, "-o", str(tmp_path / "cut"), "--resume"]) == 2
    assert "generation.do_sample: true -> false" in capsys.readouterr().err


def test_overlong_prompt_is_refused_before_any_model_loads(trio, tmp_path, capsys) -> None:
    import shutil

    weightless = tmp_path / "weightless"
    shutil.copytree(trio["large"], weightless)
    (weightless / "model.safetensors").unlink()  # loading weights would fail: the check must come first
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": [{"model": str(weightless), "role": "large"}],
                "fusion": {"method": "single", "role": "large"},
            }
        )
    )
    assert main(["generate", "-c", str(path), "-p", "hello " * 1200, "--max-new-tokens", "4"]) == 2
    assert "more than the source's context of 1024" in capsys.readouterr().err


def test_speculative_flags_keep_the_output_and_name_bad_values(config_file, tmp_path, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text("Hello world, the quick brown fox.\nئۇيغۇر تىلى\n", encoding="utf-8")
    base = ["generate", "-c", str(config_file), "-p", "Hello", "--max-new-tokens", "6"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    flags = ["--speculative", "3", "--draft-vocab", "10", "--draft-vocab-text", str(text)]
    assert main([*base, *flags]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert fast["token_ids"] == plain["token_ids"]
    assert fast["stats"]["draft_vocab"] >= 10 and fast["stats"]["rounds"] >= 1
    assert main([*base, *flags, "--inspect", "2"]) == 0
    err = capsys.readouterr().err
    assert "speculative: draft " in err and "acceptance" in err and "by position" in err
    assert main([*base, "--speculative", "three"]) == 2
    assert "--speculative" in capsys.readouterr().err
    assert main([*base, "--speculative", "3", "--draft-vocab", "10"]) == 2
    assert "draft_vocab_text" in capsys.readouterr().err
    missing = str(tmp_path / "missing.txt")
    assert main([*base, "--speculative", "3", "--draft-vocab", "10", "--draft-vocab-text", missing]) == 2
    assert "missing.txt' is not a file" in capsys.readouterr().err
