"""Bad input and awkward situations through the CLI's entry point: each case exits with a clear message
(exit 2) or a correct result, never a traceback from library internals, and leaves the disk as stated."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, trio_config
from trimix.cli.main import main

SIB_HEADER = "index_id\tcategory\ttext\n"


@pytest.fixture
def cfg(trio, tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(trio_config(trio)))
    return path


def _sib_folder(root: Path, bad_label: bool = False) -> Path:
    """A user's SIB-200 folder (a language the bundled data lacks) in the released layout."""
    (root / "xyz_Latn").mkdir(parents=True)
    (root / "labels.txt").write_text("sports\nhealth\n")
    rows = [("1", "sports", "The team won."), ("2", "health", "Eat well."), ("3", "sports", "A goal.")]
    if bad_label:
        rows[1] = ("2", "helth", "Eat well.")
    for split in ("train", "dev", "test"):
        body = "".join(f"{i}\t{c}\t{t}\n" for i, c, t in rows)
        (root / "xyz_Latn" / f"{split}.tsv").write_text(SIB_HEADER + body)
    return root


def _eval_cfg(trio, tmp_path: Path, root: str) -> Path:
    raw = trio_config(trio)
    raw["generation"] = {"max_new_tokens": 2}
    raw["eval"] = {
        "methods": [{"name": "large", "method": "single", "role": "large"}],
        "tasks": [{"task": "sib200_topic", "langs": ["xyz_Latn"], "options": {"root": root}, "shots": 1}],
    }
    path = tmp_path / "conf" / "eval.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("where", ["relative_to_config", "absolute"])
def test_a_users_own_sib200_folder_evaluates(trio, tmp_path, capsys, where) -> None:
    _sib_folder(tmp_path / "conf" / "my_sib200")
    root = "./my_sib200" if where == "relative_to_config" else str(tmp_path / "conf" / "my_sib200")
    code, _ = run_cli(
        capsys, ["-q", "eval", "-c", str(_eval_cfg(trio, tmp_path, root)), "-o", str(tmp_path / "o")]
    )
    assert code == 0
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["lang"] == "xyz_Latn"


def test_an_unknown_label_is_named_with_file_and_line_before_models_load(trio, tmp_path, capsys) -> None:
    _sib_folder(tmp_path / "conf" / "my_sib200", bad_label=True)
    path = _eval_cfg(trio, tmp_path, "./my_sib200")
    code, err = run_cli(capsys, ["eval", "-c", str(path), "-o", str(tmp_path / "o")])
    assert code == 2 and "test.tsv:3: category 'helth' is not in labels.txt" in err
    assert not (tmp_path / "o" / "predictions.jsonl").exists()


def _with_topic_task(config: Path, out: Path, options: dict) -> None:
    """``config`` with an `eval` section: one source, SIB-200 topic on Uyghur with these task options."""
    raw = yaml.safe_load(config.read_text())
    raw["eval"] = {
        "methods": [{"name": "large", "method": "single", "role": "large"}],
        "tasks": [{"task": "sib200_topic", "langs": ["uig_Arab"], "options": options}],
    }
    out.write_text(yaml.safe_dump(raw))


CASES = {
    "config_not_utf8": (
        lambda d, c: d.joinpath("bad.yaml").write_bytes(b"models: \xff\xfe\n"),
        ["generate", "-c", "{d}/bad.yaml", "-p", "x"],
        "is not UTF-8 text",
    ),
    "unknown_key": (
        lambda d, c: d.joinpath("k.yaml").write_text(c.read_text().replace("fusion:", "fusoin:")),
        ["generate", "-c", "{d}/k.yaml", "-p", "x"],
        "did you mean 'fusion'",
    ),
    "weight_true": (
        lambda d, c: d.joinpath("w.yaml").write_text(
            c.read_text().replace("role: large", "role: large\n  weight: true")
        ),
        ["generate", "-c", "{d}/w.yaml", "-p", "x"],
        "weight must be a number",
    ),
    "flag_value": (None, ["generate", "-c", "{c}", "-p", "x", "--max-new-tokens", "0"], "--max-new-tokens: "),
    "partial_weights": (
        None,
        ["generate", "-c", "{c}", "-p", "x", "--weights", "large=0.3,small_cpt=0.9"],
        "read as TriMix (small_base derived)",
    ),
    "prompts_not_utf8": (
        lambda d, c: d.joinpath("p.txt").write_bytes("caf\xe9\n".encode("latin-1")),
        ["generate", "-c", "{c}", "-f", "{d}/p.txt"],
        "prompts file",
    ),
    "output_under_a_file": (
        lambda d, c: d.joinpath("afile").write_text("x"),
        ["generate", "-c", "{c}", "-p", "x", "-o", "{d}/afile/out"],
        "which is a file",
    ),
    "overwrite_and_resume": (
        None,
        ["eval", "-c", "{c}", "-o", "{d}/o", "--overwrite", "--resume"],
        "not both",
    ),
    "not_gguf": (
        lambda d, c: d.joinpath("fake.gguf").write_bytes(b"PK\x03\x04" + b"0" * 64),
        ["generate", "-c", "{d}/g.yaml", "-p", "x"],
        "is not a GGUF file",
    ),
    "truncated_gguf": (
        lambda d, c: d.joinpath("fake.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 8),
        ["generate", "-c", "{d}/g.yaml", "-p", "x"],
        "could not read the GGUF file",
    ),
    "missing_folder": (None, ["generate", "-c", "{d}/m.yaml", "-p", "x"], "does not exist"),
    # #25: tracebacks before
    "section_not_a_mapping": (
        lambda d, c: d.joinpath("g16.yaml").write_text(c.read_text() + "cpt: 16\n"),
        ["generate", "-c", "{d}/g16.yaml", "-p", "x"],
        "`cpt` must be a mapping of settings",
    ),
    "cuda_without_gpu": (
        None,
        ["generate", "-c", "{c}", "-p", "x", "--device", "cuda:0"],
        "sees no CUDA GPU",
    ),
    "lone_surrogate_in_jsonl": (
        lambda d, c: d.joinpath("p.jsonl").write_text('{"prompt": "\\ud800"}\n'),
        ["generate", "-c", "{c}", "-f", "{d}/p.jsonl"],
        "p.jsonl:1 is not valid Unicode text",
    ),
    "undecodable_prompt_argument": (
        None,
        ["generate", "-c", "{c}", "-p", "caf\udce9"],
        "--prompt number 1 is not valid Unicode text",
    ),
    "selection_weight_not_a_number": (
        lambda d, c: d.joinpath("sel.json").write_text('{"selected": {"weights": {"large": "heavy"}}}'),
        ["generate", "-c", "{c}", "-p", "x", "--weights-from", "{d}/sel.json"],
        "sel.json: 'selected.weights' must map roles to finite numbers; {'large': 'heavy'}",
    ),
    # #25: silently wrong before
    "method_flag_contradicts_weights": (
        None,
        [
            "generate",
            "-c",
            "{c}",
            "-p",
            "x",
            "--method",
            "trimix",
            "--weights",
            "large=0.1,small_cpt=0.9,small_base=0.9",
        ],
        "--method trimix and --weights disagree",
    ),
    "duplicate_yaml_key": (
        lambda d, c: d.joinpath("dup.yaml").write_text(c.read_text() + "generation: {max_new_tokens: 3}\n"),
        ["generate", "-c", "{d}/dup.yaml", "-p", "x"],
        "the key 'generation' is given twice",
    ),
    "eval_ignores_weights": (
        None,
        ["eval", "-c", "{c}", "-o", "{d}/o", "--weights", "large=0.9,small_cpt=0.1"],
        "trimix eval does not use --weights",
    ),
    "repeated_role": (
        None,
        ["generate", "-c", "{c}", "-p", "x", "--weights", "large=0.3,large=0.9,small_cpt=0.1"],
        "gives role 'large' twice",
    ),
    "nan_weight": (None, ["generate", "-c", "{c}", "-p", "x", "--weights", "large=nan"], "finite number"),
    "blank_prompt": (None, ["generate", "-c", "{c}", "-p", "   "], "--prompt number 1 is blank"),
    "resume_nothing": (
        None,
        ["eval", "-c", "{c}", "-o", "{d}/never_made", "--resume"],
        "there is nothing to continue",
    ),
    # #25: weak messages before
    "weight_word_shows_its_value": (
        lambda d, c: d.joinpath("h.yaml").write_text(
            c.read_text().replace("role: large", "role: large\n  weight: heavy")
        ),
        ["generate", "-c", "{d}/h.yaml", "-p", "x"],
        "models.0.weight: must be a number, unable to parse string as a number (got 'heavy')",
    ),
    "task_option_misspelled": (
        lambda d, c: _with_topic_task(c, d / "o.yaml", {"rooot": "x"}),
        ["eval", "-c", "{d}/o.yaml", "-o", "{d}/out"],
        "task 'sib200_topic' has no option 'rooot'; did you mean 'root'?",
    ),
    "task_root_is_a_file": (
        lambda d, c: (
            d.joinpath("afile").write_text("x"),
            _with_topic_task(c, d / "r.yaml", {"root": str(d / "afile")}),
        ),
        ["eval", "-c", "{d}/r.yaml", "-o", "{d}/out"],
        "is a file; `root` names the folder",
    ),
    "config_is_a_folder": (
        None,
        ["generate", "-c", "{d}", "-p", "x"],
        "is a folder; pass the run's YAML file",
    ),
    "cpt_flag_out_of_range": (
        None,
        ["cpt", "--model", "{d}/m", "--corpus", "{d}/c.txt", "--lr", "-1", "-o", "{d}/cpt"],
        "--lr: must be greater than 0 (got -1.0)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_a_message(case, cfg, tmp_path, capsys, monkeypatch) -> None:
    prepare, args, message = CASES[case]
    monkeypatch.setenv("TRIMIX_CACHE", str(tmp_path / "cache"))
    if prepare:
        prepare(tmp_path, cfg)
    for name, model in (
        ("g.yaml", str(tmp_path / "fake.gguf")),
        ("m.yaml", str(tmp_path / "nowhere" / "model")),
    ):
        tmp_path.joinpath(name).write_text(
            yaml.safe_dump(
                {"models": [{"model": model, "role": "a"}], "fusion": {"method": "single", "role": "a"}}
            )
        )
    code, err = run_cli(capsys, [a.format(d=tmp_path, c=cfg) for a in args])
    assert code == 2, err
    assert message in err
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_non_utf8_stdin_fails_before_models_load(cfg, capsys, monkeypatch) -> None:
    class Stdin(io.TextIOWrapper):
        def isatty(self) -> bool:
            return False

    monkeypatch.setattr(sys, "stdin", Stdin(io.BytesIO("café".encode("latin-1"))))
    code, err = run_cli(capsys, ["generate", "-c", str(cfg)])
    assert code == 2 and "standard input is not UTF-8" in err


def test_offline_hub_id_fails_at_once(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "hub.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": [{"model": "some-org/not-cached-model", "role": "a"}],
                "fusion": {"method": "single", "role": "a"},
            }
        )
    )
    attempts: list = []  # "at once": no connection is even tried (rather than a wall-clock bound)

    def no_network(sock, address, *args):
        attempts.append(address)
        raise OSError("the test forbids network connections")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    code, err = run_cli(capsys, ["generate", "-c", str(path), "-p", "x"])
    assert code == 2 and "HF_HUB_OFFLINE is set" in err and "hf download some-org/not-cached-model" in err
    assert attempts == []


def test_a_failed_run_leaves_nothing_a_rerun_must_override(cfg, tmp_path, capsys) -> None:
    out = tmp_path / "o"
    code, _ = run_cli(
        capsys, ["generate", "-c", str(cfg), "-p", "hello " * 1200, "-o", str(out)]
    )  # too long: refused
    assert code == 2 and not (out / "generations.jsonl").exists()
    code, _ = run_cli(
        capsys, ["-q", "generate", "-c", str(cfg), "-p", "hello", "--max-new-tokens", "2", "-o", str(out)]
    )
    assert code == 0 and (out / "generations.jsonl").is_file()


def test_weights_flag_keeps_trimix_and_writes_the_derived_weight(cfg, tmp_path, capsys) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(cfg.read_text().replace("method: proxy_tuning", "method: trimix"))
    code, _ = run_cli(
        capsys,
        [
            "-q",
            "generate",
            "-c",
            str(path),
            "-p",
            "x",
            "--max-new-tokens",
            "1",
            "--weights",
            "large=0.3,small_cpt=0.9",
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert code == 0
    resolved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert resolved["fusion"]["method"] == "trimix"
    assert [m["weight"] for m in resolved["models"]] == pytest.approx([0.3, 0.9, -0.2])


def test_tasks_import_on_their_own() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from trimix.tasks import get_task; print(get_task('sib200_topic', 'uig_Arab').name)",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.strip() == "sib200_topic"


def test_a_second_run_into_a_busy_folder_is_refused(trio, tmp_path, capsys) -> None:
    from trimix.runinfo import folder_lock

    _sib_folder(tmp_path / "conf" / "my_sib200")
    config, out = _eval_cfg(trio, tmp_path, "./my_sib200"), tmp_path / "o"
    out.mkdir()
    with folder_lock(out):  # another run holds the folder
        code, err = run_cli(capsys, ["-q", "eval", "-c", str(config), "-o", str(out), "--resume"])
    assert code == 2 and "in use by another trimix run" in err
    assert not (out / "predictions.jsonl").exists() and not (out / "config.yaml").exists()


def test_an_overlong_evaluation_item_stops_at_the_context_and_is_counted(trio, tmp_path, capsys) -> None:
    """One item longer than the sources' context must not block the run: it decodes until the context is
    full, is recorded with finish_reason "context", and the report counts it."""
    root = _sib_folder(tmp_path / "conf" / "my_sib200")
    test = root / "xyz_Latn" / "test.tsv"
    test.write_text(test.read_text() + "4\tsports\t" + "goal " * 1015 + "\n")
    config = _eval_cfg(trio, tmp_path, "./my_sib200")
    raw = yaml.safe_load(config.read_text())
    raw["eval"]["tasks"][0] |= {"shots": 0, "max_chars": 100_000, "max_new_tokens": 8}
    config.write_text(yaml.safe_dump(raw))
    code, _ = run_cli(capsys, ["-q", "eval", "-c", str(config), "-o", str(tmp_path / "o")])
    assert code == 0
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["finish_reason"] == "context" for r in rows) == [False, False, False, True]
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["cells"][0]["stopped_at_context"] == 1
    assert "generations stopped at a source's context: " in (tmp_path / "o" / "report.md").read_text()


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_overwrite_into_a_busy_folder_deletes_nothing(trio, cfg, tmp_path, capsys, command) -> None:
    """--overwrite while another run writes into the folder: refused, and that run's progress file is
    untouched (it used to be deleted before the lock was checked)."""
    from trimix.runinfo import folder_lock

    _sib_folder(tmp_path / "conf" / "my_sib200")
    out = tmp_path / "o"
    out.mkdir()
    progress = out / ("predictions.jsonl" if command == "eval" else "generations.jsonl")
    progress.write_text('{"id": 0, "text": "the other run\'s work"}\n')
    args = (
        ["-q", "eval", "-c", str(_eval_cfg(trio, tmp_path, "./my_sib200"))]
        if command == "eval"
        else ["-q", "generate", "-c", str(cfg), "-p", "Hello"]
    )
    before = progress.read_bytes()
    with folder_lock(out):  # another run holds the folder
        code, err = run_cli(capsys, [*args, "-o", str(out), "--overwrite"])
    assert code == 2 and "in use by another trimix run" in err
    assert progress.read_bytes() == before


def test_a_damaged_line_in_the_middle_is_an_error_and_nothing_is_truncated(tmp_path, capsys) -> None:
    from trimix.errors import DataError
    from trimix.io import read_jsonl

    path = tmp_path / "predictions.jsonl"
    lines = [json.dumps({"id": i}) for i in range(5)]
    lines[2] = lines[2][:-3]  # damaged, but not the last line
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    with pytest.raises(DataError, match=r"predictions.jsonl:3: not a complete JSON line"):
        read_jsonl(path)
    assert path.read_bytes() == before
    code, err = run_cli(capsys, ["report", str(tmp_path)])
    assert code == 2 and "predictions.jsonl:3" in err and path.read_bytes() == before


def test_only_a_torn_last_line_is_dropped(tmp_path, caplog) -> None:
    from trimix.io import read_jsonl

    path = tmp_path / "generations.jsonl"
    whole = "".join(json.dumps({"id": i}) + "\n" for i in range(3))
    path.write_text(whole + '{"id": 3, "te')
    assert read_jsonl(path, repair=False) == [{"id": 0}, {"id": 1}, {"id": 2}]
    assert path.read_text().endswith('"te')  # a reader that does not repair leaves the file alone
    assert read_jsonl(path) == [{"id": 0}, {"id": 1}, {"id": 2}]
    assert path.read_text() == whole and "incomplete last line" in caplog.text


def test_a_full_disk_during_generate_names_it_and_loses_nothing_printed(
    cfg, tmp_path, capsys, monkeypatch
) -> None:
    """The second batch cannot be written: one message (no traceback), exit 2, and every row printed
    before is on disk (rows are written before they are printed)."""
    import errno
    import os as os_module

    import trimix.io

    calls = {"n": 0}
    real_fsync = os_module.fsync

    def fsync(fd):  # the disk fills up at the second batch of generations.jsonl
        if os_module.readlink(f"/proc/self/fd/{fd}").endswith("generations.jsonl"):
            calls["n"] += 1
            if calls["n"] >= 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(trimix.io.os, "fsync", fsync)
    out = tmp_path / "o"
    code = main(
        [
            "-q",
            "generate",
            "-c",
            str(cfg),
            "-p",
            "Hello",
            "-p",
            "The quick",
            "-o",
            str(out),
            "--batch-size",
            "1",
        ]
    )
    captured = capsys.readouterr()
    assert code == 2 and "no space left on the device" in captured.err and "Traceback" not in captured.err
    printed = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    on_disk = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(printed) == 1 and [r["id"] for r in on_disk][: len(printed)] == [r["id"] for r in printed]


def test_a_byte_order_mark_is_read_as_nothing(tmp_path) -> None:
    """Files saved by editors that write a UTF-8 byte-order mark read as the same text (#25: a BOM made the
    header 'bad' and the first label 'absent')."""
    from trimix.data import read_sib200, sib200_labels

    root = _sib_folder(tmp_path / "sib")
    for path in [root / "labels.txt", *(root / "xyz_Latn").glob("*.tsv")]:
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert sib200_labels(root) == ["sports", "health"]
    assert [r.category for r in read_sib200("xyz_Latn", "test", root)] == ["sports", "health", "sports"]


def test_a_config_from_a_pipe_is_read(tmp_path, capsys) -> None:
    """``-c <(...)`` hands trimix a pipe: it is read (relative paths from the working directory), not
    called missing."""
    import os

    read, write = os.pipe()
    raw = {
        "models": [{"model": str(tmp_path / "absent"), "role": "a"}],
        "fusion": {"method": "single", "role": "a"},
    }
    os.write(write, yaml.safe_dump(raw).encode())
    os.close(write)
    try:
        code, err = run_cli(capsys, ["generate", "-c", f"/dev/fd/{read}", "-p", "x"])
    finally:
        os.close(read)
    assert code == 2 and "model path" in err and "absent" in err and "config file '" not in err, err
