"""The Ray executor on a local Ray instance with 2 workers (tiny models): the same predictions and report as
the local executor, a worker killed mid-run changes nothing, and a bad address fails before models load."""

from __future__ import annotations

import pytest
import ray  # an extra that scripts/setup.sh installs: a broken install fails, never skips
import yaml

from conftest import assert_same_rows, row_key, trio_config
from trimix.cli.main import main
from trimix.config import load_config
from trimix.evaluation import Evaluator, read_predictions, write_report


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(trio, tmp_path) -> dict:
    raw = trio_config(trio, method="trimix")
    raw["models"][0]["weight"], raw["models"][1]["weight"] = 0.3, 0.9
    raw["generation"] = {"max_new_tokens": 3}
    text = tmp_path / "heldout.txt"
    text.write_text("ئۇيغۇر تىلى تۈركىي تىللار.\nبۈگۈن ھاۋا ناھايىتى ياخشى.\nمەكتەپتە ئوقۇغۇچىلار.\n")
    raw["eval"] = {
        "methods": [
            {"name": "large", "method": "single", "role": "large"},
            {"name": "trimix", "method": "trimix", "weights": {"large": 0.3, "small_cpt": 0.9}},
            {"name": "selected", "method": "trimix", "select": True},
        ],
        "tasks": [
            {"task": "sib200_topic", "langs": ["uig_Arab"], "limit": 4, "shots": 0},
            {
                "task": "sib200_topic",
                "langs": ["uig_Arab"],
                "limit": 4,
                "shots": 0,
                "scoring": "loglikelihood",
            },
            {
                "task": "text_ppl",
                "langs": ["uig_Arab"],
                "options": {"path": str(text), "dev_path": str(text)},
            },
        ],
        "batch_size": 2,
        "executor": {"workers": 2, "shard_items": 2, "threads_per_worker": 1},
    }
    raw["search"] = {"n_prompts": 3, "refine_rounds": 0, "shots": 0}
    return raw


def _rows(folder) -> list[dict]:
    return sorted(read_predictions(folder / "predictions.jsonl"), key=row_key)


def _run(raw, folder, executor: str) -> None:
    folder.mkdir()
    evaluator = Evaluator(load_config(raw), folder, progress=False, executor=executor)
    try:
        evaluator.run()
    finally:
        evaluator.close()


def test_ray_equals_local_even_when_a_worker_dies(ray_instance, trio, tmp_path, monkeypatch) -> None:
    raw = _config(trio, tmp_path)
    _run(raw, tmp_path / "local", "local")
    # Two Ray workers; one of them dies while computing its second unit (its rows unsent): the unit is
    # recomputed on a fresh worker, and the run ends with exactly the local executor's rows and report.
    monkeypatch.setenv("TRIMIX_FAULTS", "ray.unit:2")
    monkeypatch.setenv("TRIMIX_FAULTS_ONCE", str(tmp_path / "fired"))
    _run(raw, tmp_path / "ray", "ray")
    assert (tmp_path / "fired").exists()  # the kill did happen
    local, on_ray = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert len(local) == 3 * (4 + 4 + 3)  # 3 methods x (4 generated + 4 scored items + 3 texts), none twice
    # Both executors run torch with 1 thread (threads_per_worker) but batch the work differently (Ray
    # shards cells into units of shard_items): floats agree to float32 precision, all else exactly.
    assert_same_rows(on_ray, local)
    assert_same_rows(write_report(tmp_path / "ray")[1], write_report(tmp_path / "local")[1], "report")


def test_unreachable_ray_address_fails_before_models_load(trio, tmp_path, capsys) -> None:
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(_config(trio, tmp_path)))
    code = main(
        [
            "eval",
            "-c",
            str(path),
            "-o",
            str(tmp_path / "o"),
            "--executor",
            "ray",
            "--ray-address",
            "127.0.0.1:9",
        ]
    )
    assert code == 2 and "no Ray cluster answers at 127.0.0.1:9" in capsys.readouterr().err
