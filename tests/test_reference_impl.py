"""trimix decodes exactly what the TriMix authors' implementation decodes, on the same saved models.

Runs ``bench/reference_compare.py --shapes tiny --check-tokens``: the authors' ``TriMixQwen`` loop
under the transformers it pins (4.47, in its own process) against ``trimix.load`` on three tiny
float32 Qwen2 models (``large`` with padded output rows, which the reference resizes the small models
to), ragged batches, greedy; and its weight search (get_perplexity.py's scoring of the 6 x 6 grid)
against ``trimix select``'s with ``average: texts``. The reference is not part of trimix and cannot be
fetched offline: the test skips unless it was fetched into ``.reference/`` as the script's docstring
says.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / ".reference"
fetched = (REFERENCE / "TriMix" / "dexperts.py").is_file() and any((REFERENCE / "wheels").glob("*.whl"))
pytestmark = pytest.mark.skipif(
    not fetched,
    reason="the authors' implementation is not in .reference/ (see bench/reference_compare.py to fetch it)",
)


@pytest.mark.parametrize(
    "fusion",
    [
        ["--weights", "0.3", "0.5"],  # all three sources, plausibility on small_cpt (the reference's default)
        # Proxy Tuning, no constraint; and both weight searches on models without padded rows.
        ["--weights", "1.0", "1.0", "--plausibility-alpha", "0", "--search", "--padded-rows", "0"],
    ],
    ids=["trimix_plausibility", "proxy_tuning"],
)
def test_same_tokens_as_the_authors_implementation(tmp_path: Path, fusion: list[str]) -> None:
    out = tmp_path / "compare.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "reference_compare.py"),
            "--shapes",
            "tiny",
            "--check-tokens",
            "--batch-sizes",
            "1",
            "3",
            "--new-tokens",
            "16",
            "--workdir",
            str(tmp_path),
            "--json",
            str(out),
            *fusion,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert row["trimix_eager_tokens"]["identical_rows"] == row["prompts"] == 8
    if "--search" in fusion:
        search = result["search"]
        assert search["points"] == 36 and search["same_scored_tokens"]
        assert search["max_relative_difference"] < 1e-5
        assert search["trimix_selects"] == search["reference_selects"]
