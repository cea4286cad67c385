"""The four rules of #25, each walked across the entry points (subcommands, the server, lm-eval's
``model_args``). Per-case regressions live in ``test_bad_input.py``; here each rule is checked the same
way for every command that it concerns.

1. Nothing is deleted before the new run is known to be valid (and its folder locked).
2. Every value a user gives is checked where it enters, named with the value.
3. Resumable commands fingerprint their inputs' content, not their names.
4. One exit-code contract: 0 done, 2 bad input, 130 interrupted; no traceback for what a user can cause.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, trio_config

PREVIOUS = {
    "eval": "predictions.jsonl",
    "generate": "generations.jsonl",
    "select": "selections",
    "cpt": "checkpoints",
}


@pytest.fixture
def cfg(trio, tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(trio_config(trio)))
    return path


@pytest.mark.parametrize(
    ("command", "bad"),
    [
        ("eval", ["--weights", "large=0.5"]),  # eval takes its weights from the run's methods
        ("generate", ["--max-new-tokens", "0"]),
        ("select", ["--weights", "large=nan"]),
        ("cpt", ["--lr", "-1", "--corpus", "{corpus}"]),
    ],
)
def test_rule_1_overwrite_with_bad_input_deletes_nothing(cfg, tmp_path, capsys, command, bad) -> None:
    out = tmp_path / "out"
    previous = out / PREVIOUS[command]
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\n" * 20)
    bad = [b.format(corpus=corpus) for b in bad]
    if command in ("select", "cpt"):
        previous.mkdir(parents=True)
        (previous / "kept.json").write_text("{}")
    else:
        out.mkdir()
        previous.write_text('{"id": 0}\n')
    prompt = ["-p", "x"] if command == "generate" else []
    code, err = run_cli(capsys, [command, "-c", cfg, *prompt, "-o", out, "--overwrite", *bad])
    assert code == 2 and previous.exists(), err


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["generate", "-c", "{c}", "-p", "x", "--max-new-tokens", "-3"], "--max-new-tokens"),
        (["eval", "-c", "{c}", "-o", "{d}/e", "--weights", "large=1"], "--weights"),
        (["select", "-c", "{c}", "-o", "{d}/s", "--weights", "large=inf"], "got inf"),
        (["cpt", "--model", "{d}/m", "--corpus", "{d}/c.txt", "--lr", "-1", "-o", "{d}/t"], "--lr"),
        (["serve", "-c", "{c}", "--port", "0"], "--port"),
        (["report", "{d}/nothing_here"], "nothing_here"),
        (["demo", "--scale", "0", "--out", "{d}/demo"], "--scale must be positive; got 0.0"),
        (["ls", "nothing"], "invalid choice: 'nothing'"),
    ],
)
def test_rule_2_every_entry_point_names_the_bad_value(cfg, tmp_path, capsys, args, named) -> None:
    code, err = run_cli(capsys, [a.format(c=cfg, d=tmp_path) for a in args])
    assert code == 2 and named in err, err


def test_rule_2_lm_eval_model_args_name_the_bad_value(cfg) -> None:
    from trimix.errors import ConfigError
    from trimix.lm_eval import TrimixLM

    for args, named in (
        (f"config={cfg},batch_size=abc", "abc"),
        (f"config={cfg},weights=large:nan", "model_args weights"),
    ):
        with pytest.raises(ConfigError, match=named):
            TrimixLM.create_from_arg_string(args)


def test_rule_2_the_server_names_the_bad_field(trio) -> None:
    """Request fields enter through the pydantic models: a 400 naming the field and the value."""
    httpx = pytest.importorskip("httpx")
    from trimix import FusedLM, load_config
    from trimix.server import BackgroundServer, Server

    lm = FusedLM.from_config(load_config(trio_config(trio)))
    with BackgroundServer(Server(lm)) as running:
        for body, param, shown in (
            ({"prompt": "x", "temperature": "hot"}, "temperature", "'hot'"),
            ({"prompt": "x", "n": 99}, "n", "99"),
            ({"prompt": "x", "trimix": {"weights": {"large": "heavy"}}}, "trimix.weights.large", "'heavy'"),
        ):
            answer = httpx.post(f"{running.url}/v1/completions", json=body, timeout=60)
            error = answer.json()["error"]
            assert answer.status_code == 400 and error["param"] == param and shown in error["message"], error


def test_rule_3_resume_checks_content_not_names(cfg, tmp_path, capsys) -> None:
    """generate --resume with the same prompts file name but other prompts is refused; eval and cpt are
    covered by ``test_eval.py`` (item digests) and ``test_cpt.py`` (corpus digest)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    out = tmp_path / "g"
    assert run_cli(capsys, ["generate", "-c", cfg, "-f", prompts, "-o", out, "--max-new-tokens", "2"])[0] == 0
    prompts.write_text("one\nthree\n")
    code, err = run_cli(
        capsys, ["generate", "-c", cfg, "-f", prompts, "-o", out, "--max-new-tokens", "2", "--resume"]
    )
    assert code == 2 and "prompts" in err, err
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2  # nothing was mixed in or lost


@pytest.mark.parametrize("command", ["generate", "eval", "cpt", "select"])
def test_rule_4_an_operating_system_refusal_is_a_message(cfg, tmp_path, capsys, monkeypatch, command) -> None:
    """A folder the system will not let trimix write (read-only; simulated, as root may write anywhere):
    exit 2 with the path and the reason, no traceback."""
    import errno

    locked = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(locked)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\n" * 20)
    extra = {
        "generate": ["-c", cfg, "-p", "x"],
        "eval": ["-c", cfg],
        "cpt": [
            "-c",
            cfg,
            "--model",
            str(Path(yaml.safe_load(cfg.read_text())["models"][2]["model"])),
            "--corpus",
            corpus,
        ],
        "select": ["-c", cfg],
    }[command]
    code, err = run_cli(capsys, [command, *extra, "-o", locked / "out"])
    assert code == 2 and "permission" in err.lower() and str(locked) in err, err


def test_rule_4_exit_codes(cfg, tmp_path, capsys, monkeypatch) -> None:
    """0 done, 2 bad input, 130 interrupted (with the resume hint)."""
    from trimix import faults

    assert run_cli(capsys, ["generate", "-c", cfg, "-p", "x", "--max-new-tokens", "1"])[0] == 0
    assert run_cli(capsys, ["generate", "-c", cfg, "-p", "x", "--max-new-tokens", "0"])[0] == 2
    faults.reset()
    monkeypatch.setenv(faults.ENV, "generate.row:2")
    try:
        code, err = run_cli(
            capsys, ["generate", "-c", cfg, "-p", "x", "-p", "y", "-o", tmp_path / "i", "--batch-size", "1"]
        )
    finally:
        monkeypatch.delenv(faults.ENV)
        faults.reset()
    assert code == 130 and "--resume" in err, err
