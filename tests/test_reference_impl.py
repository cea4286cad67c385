"""trimix decodes exactly what the TriMix authors' implementation decodes, on the same saved models.

Two modes:

* **golden** (always runs): the authors' outputs on the test models — generated token ids, search
  perplexities and selected weights, prompt strings — were recorded once where their code was fetched,
  by ``bench/make_reference_golden.py``, into ``tests/golden/reference/`` (each file says how: the
  command, the reference commit, the transformers it ran under). Here trimix runs on the same models
  (rebuilt from their seeded recipe and checked against a recorded fingerprint), the same prompt token
  ids and the same weights, and must reproduce them.
* **live** (when the reference is in ``.reference/``, as ``bench/reference_compare.py`` says): the
  authors' ``TriMixQwen`` loop under the transformers it pins (4.47, in its own process) against
  ``trimix.load``, side by side, and their ``prompts.py`` against trimix's prompts (and the golden
  strings). The decoding comparisons take about two minutes: they are marked ``slow`` (``-m slow``).

The cases: three tiny float32 Qwen2 models (``large`` with padded output rows, which the reference
resizes the small models to), ragged batches, greedy; and the weight search (get_perplexity.py's
scoring of the 6 x 6 grid) against ``trimix select``'s with ``average: texts``; and ``mini``, the GPU
run's word-level Qwen2.5 structure at CPU size.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch

from conftest import MILIC
from trimix.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / ".reference"
GOLDEN = Path(__file__).resolve().parent / "golden" / "reference"
fetched = (REFERENCE / "TriMix" / "dexperts.py").is_file() and any((REFERENCE / "wheels").glob("*.whl"))
live = pytest.mark.skipif(
    not fetched,
    reason="the authors' implementation is not in .reference/ (see bench/reference_compare.py to fetch it)",
)
CASES = ("trimix_plausibility", "proxy_tuning", "mini")
REGENERATE = "python bench/make_reference_golden.py (with the reference fetched into .reference/)"

# A greedy step is compared only while its decision margin (bench/make_reference_golden.py
# decision_margins: the fused top-1 over top-2 log-probability gap, and the distance to the plausibility
# threshold) exceeds this. float32 logits of these models (|L| <~ 30) carry errors of a few ulps, ~1e-6
# nats, between CPUs (AVX-512, AVX2, ATEN_CPU_CAPABILITY=default, whose seeded init also rounds the
# weights differently) and thread counts; 1e-4 is ~100x that. The recorded margins are all >= 1.4e-3.
MARGIN_BOUND = 1e-4
# Search perplexities, relative: exp(mean NLL) over a few hundred tokens, each log-softmax term exact to
# a few ulps of its log-normaliser (~1e-6 nats), so the mean NLL, and hence the perplexity's relative
# value, agrees to ~1e-6 at worst. Measured against the reference's values: at most 2.6e-7 with AVX-512,
# AVX2 and default kernels and 1 to 4 threads. 1e-5 leaves a >10x margin.
SEARCH_TOLERANCE = 1e-5


@cache
def tools():
    """bench/make_reference_golden.py: the models' recipe, fingerprint, margins and comparison, shared
    with the script that wrote the golden files."""
    path = ROOT / "bench" / "make_reference_golden.py"
    spec = importlib.util.spec_from_file_location("make_reference_golden", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def golden(name: str) -> dict:
    path = GOLDEN / f"{name}.json"
    assert path.is_file(), f"no golden file {path.relative_to(ROOT)}; write it with {REGENERATE}"
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------ decoding and search: golden
@pytest.fixture
def one_thread():
    """One intra-op thread: these models' matrices are too small to split, and on a shared, loaded CPU
    the threads' synchronisation made decoding ~10x slower (25 s instead of 2 s for mini on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", CASES)
def test_same_tokens_as_the_authors_golden_outputs(tmp_path: Path, case: str, one_thread) -> None:
    g = golden(case)
    t = tools()
    arguments = g["produced_by"]["case_arguments"]
    paths = t.build_models(arguments, tmp_path)
    lm = t.load_fused(arguments, paths)

    # The same models and tokenizer as the golden data's: a changed build fails here, not as odd tokens.
    ids = g["prompts"]["token_ids"]
    problems = t.fingerprint_differences(t.fingerprint(lm, ids[0]), g["models"]["fingerprint"])
    assert not problems, (
        f"the test models built by {g['models']['recipe']} are not those the golden data "
        f"({case}.json) was made with:\n  " + "\n  ".join(problems[:10]) + f"\nIf the build changed on "
        f"purpose, regenerate the golden data: {REGENERATE}"
    )
    texts = g["prompts"]["texts"]
    assert t.prompt_ids(lm, texts) == ids, (
        f"the tokenizer encodes the golden prompts differently; if on purpose: {REGENERATE}"
    )

    new_tokens = g["generation"]["new_tokens"]
    cut, compared, rows = [], 0, 0
    for row in g["generation"]["rows"]:
        theirs = row["tokens"]
        ours = t.trimix_tokens(lm, texts[: len(theirs)], row["batch"], new_tokens)
        report = t.compare_tokens(ours, theirs, row["margins"], MARGIN_BOUND)
        assert not report["mismatches"], (
            f"batch {row['batch']}: trimix decodes other tokens than the reference at (row, position, "
            f"trimix, reference) {report['mismatches']}, each before any near-tie"
        )
        cut += [(row["batch"], *c) for c in report["cut"]]
        compared += report["compared"]
        rows += report["rows"]
    assert len(cut) < rows, f"every row hit a near-tie before its end: nothing compared fully ({cut})"
    if cut:
        warnings.warn(
            f"{case}: {len(cut)} of {rows} rows compared only up to a near-tie (batch, row, position, "
            f"margin): {cut}",
            stacklevel=1,
        )
    print(f"{case}: {compared} tokens compared in {rows} rows, {len(cut)} rows cut at a near-tie")

    search = g.get("search")
    if search:
        mine = t.rc.trimix_search(lm, search["texts"], search["grid"])
        assert mine["token_ids"] == search["token_ids"], "the searches score different tokens"
        differences = {}
        for point in search["points"]:
            a, b, _ = point["weights"]
            differences[(a, b)] = mine["points"][(a, b)] / point["perplexity"] - 1
        if search["padded_rows"]:
            # The reference log-softmaxes over the padded rows too (the small models resized to large's
            # rows, their new rows drawn at random), trimix over the vocabulary: the reference's perplexity
            # can only be the larger one (by 2.4% on mini), which is all that is checked; the selections
            # may differ on a flat grid (they do on mini).
            worst = max(differences.values())
            assert worst <= SEARCH_TOLERANCE, f"trimix's perplexity above the reference's by {worst:.2e}"
        else:
            worst = max(abs(d) for d in differences.values())
            assert worst <= SEARCH_TOLERANCE, f"perplexities differ by up to {worst:.2e} (relative)"
            # The same selection wherever float32 cannot reorder the best two points: both sides within
            # SEARCH_TOLERANCE of the reference's values, and those values more than twice that apart.
            if search["relative_gap_to_second"] > 2 * SEARCH_TOLERANCE:
                best = min(mine["points"], key=mine["points"].get)
                assert list(best) == search["reference_selects"]
            else:
                warnings.warn(f"{case}: the best two grid points are within float32 noise", stacklevel=1)


# ------------------------------------------------------------------ decoding and search: live
@pytest.mark.slow
@live
@pytest.mark.parametrize(
    ("shapes", "fusion"),
    [
        ("tiny", ["--weights", "0.3", "0.5"]),
        ("tiny", ["--weights", "1.0", "1.0", "--plausibility-alpha", "0", "--search", "--padded-rows", "0"]),
        ("mini", ["--search", "--search-texts", "4", "--search-tokens", "32"]),
    ],
    ids=list(CASES),
)
def test_same_tokens_as_the_authors_implementation(tmp_path: Path, shapes: str, fusion: list[str]) -> None:
    out = tmp_path / "compare.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "reference_compare.py"),
            "--shapes",
            shapes,
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
        if "--padded-rows" in fusion:  # no padded rows: both normalise over the same rows
            assert search["max_relative_difference"] < SEARCH_TOLERANCE
            assert search["trimix_selects"] == search["reference_selects"]


# ------------------------------------------------------------------ paper prompts
@cache
def paper_prompts_module():
    """The authors' prompts.py (pure Python: it builds the prompt strings their inference and search use)."""
    return tools().load_paper_prompts_module(REFERENCE / "TriMix")


def their_prompts(source: str, task: str, items: list[dict], shots: int, prompt_lang: str) -> list[str]:
    """The authors' prompt strings: recorded (golden), or built by their prompts.py (live, which must also
    still match the recording)."""
    recorded = golden("paper_prompts")
    assert recorded["items_sha256"] == tools().items_digest(MILIC), (
        f"tests/conftest.py's MILIC items changed since the golden prompts were recorded: {REGENERATE}"
    )
    strings = recorded["prompts"][f"{task}/{prompt_lang}/{shots}"]
    if source == "live":
        built = tools().paper_prompt_inputs(paper_prompts_module(), task, items, shots, prompt_lang)
        if task != "classification":  # its label order is a set's (see below): compared there
            assert built == strings, f"prompts.py no longer builds the golden prompts: {REGENERATE}"
        strings = built
    return strings


# The live variants run only with -m slow (and the reference fetched): the default suite skips nothing here.
SOURCES = ["golden", pytest.param("live", marks=[pytest.mark.slow, live])]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("shots", [0, 3])
@pytest.mark.parametrize("prompt_lang", ["en", "zh"])
@pytest.mark.parametrize(
    ("task", "folder", "options", "builder"),
    [
        ("milic_reading_comprehension", "reading_comprehension", {}, "rc"),
        ("milic_response_selection", "response_selection", {}, "rs"),
        ("milic_title_generation", "title_generation_200", {}, "title"),
        ("milic_math", "math", {}, "math"),
        ("milic_translation", "translation_dialogue", {"target": "en"}, "ug2en"),
        ("milic_translation", "translation_dialogue", {"source": "zh", "target": "ug"}, "zh2ug"),
    ],
)
def test_paper_prompts_are_the_authors_prompts(
    milic_root, task, folder, options, builder, prompt_lang, shots, source
) -> None:
    items = MILIC[folder]
    t = get_task(task, "ug", root=str(milic_root), prompt_lang=prompt_lang, n_shots=shots, **options)
    theirs = their_prompts(source, builder, items, shots, prompt_lang)
    ours = [t.render(e).text for e in t.examples("test")]
    assert ours == theirs


def _sorted_labels(prompt: str, label_line: str, sep: str) -> str:
    """The prompt with its candidate-label line's labels in sorted order."""
    written = next(line for line in prompt.splitlines() if line.startswith(label_line))
    labels = written[len(label_line) :]
    return prompt.replace(label_line + labels, label_line + sep.join(sorted(labels.split(sep))))


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("per_label", [0, 1])
@pytest.mark.parametrize("prompt_lang", ["en", "zh"])
def test_paper_classification_prompts_up_to_label_order(milic_root, prompt_lang, per_label, source) -> None:
    """The authors walk the labels in a Python set's order (it changes between processes), trimix sorted:
    the same prompts once the label list is written in one order, and the same exemplar blocks."""
    items = MILIC["text_classification"]
    t = get_task(
        "milic_text_classification", "ug", root=str(milic_root), prompt_lang=prompt_lang, n_shots=per_label
    )
    label_line = "候选类别：" if prompt_lang == "zh" else "Candidate labels: "
    sep = "、" if prompt_lang == "zh" else ", "
    theirs = their_prompts(source, "classification", items, per_label, prompt_lang)
    if source == "live":  # the recording, up to the same label order
        recorded = golden("paper_prompts")["prompts"][f"classification/{prompt_lang}/{per_label}"]
        normal = [sorted(_sorted_labels(p, label_line, sep).split("\n\n")) for p in theirs]
        assert normal == [sorted(_sorted_labels(p, label_line, sep).split("\n\n")) for p in recorded]
    for example, paper in zip(t.examples("test"), theirs, strict=True):
        paper_text = _sorted_labels(paper, label_line, sep)
        ours = t.render(example).text
        *their_shots, their_item = paper_text.split("\n\n")
        *our_shots, our_item = ours.split("\n\n")
        assert our_item == their_item and sorted(our_shots) == sorted(their_shots)
        assert len(our_shots) == 2 * per_label
