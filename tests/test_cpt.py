"""Continual pretraining on tiny models: learning, exact resume, reload, and corpus errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trimix import FusedLM, load_config
from trimix.backends import load_source
from trimix.cli.main import main
from trimix.config import CptConfig, SourceConfig
from trimix.errors import ConfigError, DataError
from trimix.testing import CORPUS
from trimix.training import CptInterrupted, pack_blocks, read_documents, run_cpt, split_corpus
from trimix.training.cpt import held_out_perplexity


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "uig.txt"
    # A small repeated corpus (with exact duplicates to drop) so that the loss must fall.
    lines = [CORPUS[4], CORPUS[5], CORPUS[6], CORPUS[0], CORPUS[1]] * 8 + [
        f"{CORPUS[4]} {i}" for i in range(30)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def base(make_model) -> SourceConfig:
    return SourceConfig(model=str(make_model("llama", seed=11)), role="small_base")


def _cpt(corpus: str, **kw) -> CptConfig:
    settings = dict(
        corpus=[corpus],
        block_size=32,
        batch_size=4,
        max_steps=6,
        save_every=3,
        learning_rate=5e-3,
        forgetting_text="sib200:eng_Latn:dev",
        warmup_ratio=0.0,
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
    )
    settings.update(kw)
    return CptConfig(**settings)


def test_loss_and_heldout_perplexity_fall(base, corpus, tmp_path) -> None:
    report = run_cpt(base, _cpt(corpus, max_steps=20, save_every=100), tmp_path, progress=False)
    assert report.train_loss[-1] < report.train_loss[0]
    assert report.perplexity_after["heldout_lrl"] < report.perplexity_before["heldout_lrl"]
    assert "heldout_hrl" in report.perplexity_after and report.corpus["duplicates_removed"] > 0
    assert report.tokens_seen == 20 * 4 * 32
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "held-out perplexity" in card and "forgetting check" in card


def _interrupted(point: str, monkeypatch, run) -> None:
    from trimix import faults

    faults.reset()
    monkeypatch.setenv(faults.ENV, point)
    try:
        run()
    finally:
        monkeypatch.delenv(faults.ENV)
        faults.reset()


def _same_adapters(a_dir, b_dir) -> None:
    a = load_file(a_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_interrupt_then_resume_equals_uninterrupted(base, corpus, tmp_path, monkeypatch, caplog) -> None:
    straight = tmp_path / "straight"
    run_cpt(base, _cpt(corpus), straight, progress=False)

    broken = tmp_path / "broken"
    with pytest.raises(CptInterrupted, match=r"interrupted at step 2/6.*--resume"):  # Ctrl-C after step 2
        _interrupted("cpt.step:2", monkeypatch, lambda: run_cpt(base, _cpt(corpus), broken, progress=False))
    assert (broken / "checkpoints" / "checkpoint-2").is_dir()
    # Resumed, it dies again while writing the checkpoint of step 3: that folder is left incomplete.
    with pytest.raises(KeyboardInterrupt):
        _interrupted(
            "cpt.checkpoint:1",
            monkeypatch,
            lambda: run_cpt(base, _cpt(corpus), broken, progress=False, resume=True),
        )
    assert (broken / "checkpoints" / "checkpoint-3").is_dir()
    with caplog.at_level("WARNING", logger="trimix.training.cpt"):
        report = run_cpt(base, _cpt(corpus), broken, progress=False, resume=True)
    assert "ignoring the incomplete checkpoint" in caplog.text and "checkpoint-3" in caplog.text
    assert report.resumed_from.endswith("checkpoint-2") and report.steps == 6
    _same_adapters(straight, broken)


def test_saved_adapter_reloads_as_a_source_with_the_same_logits(base, corpus, tmp_path) -> None:
    run_cpt(base, _cpt(corpus, max_steps=3), tmp_path, progress=False)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base.model), tmp_path / "adapter"
    )
    ids = torch.tensor([[1, 17, 33, 9, 70]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        loaded = load_source(SourceConfig(model=str(tmp_path / "adapter"), role="small_cpt", weight=1.0))
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    sources = [
        {"model": str(tmp_path / "adapter"), "role": "small_cpt"},
        {"model": base.model, "role": "small_base"},
    ]
    lm = FusedLM.from_config(
        load_config({"models": sources, "fusion": {"method": "single", "role": "small_cpt"}})
    )
    assert len(lm.generate(["Hello"], max_new_tokens=3, ignore_eos=True)[0].token_ids) == 3


def test_full_finetuning_changes_every_weight_and_saves_the_trained_model(base, corpus, tmp_path) -> None:
    settings = _cpt(corpus, method="full", max_steps=2, learning_rate=1e-3)
    report = run_cpt(base, settings, tmp_path / "full", progress=False)
    assert report.method == "full" and report.output == str(tmp_path / "full" / "model")
    before = load_file(f"{base.model}/model.safetensors")
    after = load_file(tmp_path / "full" / "model" / "model.safetensors")
    assert after.keys() == before.keys()
    # Adam's first step moves every element with a non-zero gradient by about the learning rate, whatever
    # the gradient's scale: each tensor must move by at least half of it somewhere (float32 resolves steps of
    # ~1e-7 on these weights of magnitude ~1, so 5e-4 is no rounding effect).
    unchanged = [k for k in before if (after[k] - before[k]).abs().max() < settings.lr() / 2]
    assert not unchanged, f"not trained: {unchanged}"
    # The saved weights are the trained ones: reloaded, they give the held-out perplexity the run measured
    # on its in-memory model after training (and the base gives the one it measured before). Both are the
    # same float32 computation on the same weights and texts; perplexity = exp(mean NLL), so a relative
    # difference equals the NLL's absolute one, here ~5 nats: 1e-5 allows ~30 float32 ulps (6e-8 x 5.3) of
    # reordered summation, while training moved the perplexity by several percent.
    split = split_corpus(
        settings.corpus,
        settings.text_field,
        settings.dedup,
        settings.seed,
        settings.validation_fraction,
        settings.max_validation_lines,
    )
    trained = load_source(SourceConfig(model=report.output, role="small_cpt", weight=1.0))
    original = load_source(base.model_copy(update={"weight": 1.0}))
    after_ppl, before_ppl = report.perplexity_after["heldout_lrl"], report.perplexity_before["heldout_lrl"]
    assert held_out_perplexity(trained, split.validation) == pytest.approx(after_ppl, rel=1e-5, abs=0)
    assert held_out_perplexity(original, split.validation) == pytest.approx(before_ppl, rel=1e-5, abs=0)
    assert abs(after_ppl - before_ppl) > 100 * 1e-5 * before_ppl


def test_merged_model_has_the_adapter_models_logits(base, corpus, tmp_path) -> None:
    """``merge: true`` saves W + (alpha / r) B A: the same function as the base with its adapter. The adapter
    merged is the last checkpoint's (the run saves one at its final step)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    report = run_cpt(base, _cpt(corpus, max_steps=2, merge=True), tmp_path, progress=False)
    assert report.output == str(tmp_path / "merged") and not (tmp_path / "adapter").exists()
    adapter = tmp_path / "checkpoints" / "checkpoint-2"
    ids = torch.tensor([[1, 17, 33, 9, 70, 5, 120, 44, 3, 98, 150, 11]])
    with torch.no_grad():
        merged = load_source(SourceConfig(model=report.output, role="small_cpt", weight=1.0))
        merged_logits = merged.model(input_ids=ids).logits
        unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.model), adapter)
        adapter_logits = unmerged(input_ids=ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(base.model)(input_ids=ids).logits
    # Both are float32 evaluations of one function, differing in rounding only: the merged weights are
    # rounded once, and the adapter adds x A^T B^T to x W^T in another order. A float32 result of n chained
    # roundings is within n * u (u = 2^-24, the unit roundoff) of exact, relative to the magnitudes
    # involved; along this forward n is the sum of the dot-product lengths met in sequence (per layer: the
    # projections, the attention over the sequence, the MLP; then the head) and the magnitudes are those of
    # the logits. Twice that bound (one per model) is the tolerance.
    config = merged.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_layer = 3 * config.hidden_size + head_dim + ids.shape[1] + config.intermediate_size
    n = config.num_hidden_layers * per_layer + config.hidden_size
    tolerance = 2 * n * 2.0**-24 * float(adapter_logits.abs().max())
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=0, atol=tolerance)
    # ...and the adapter really changed the function, by far more than that tolerance.
    assert (merged_logits - base_logits).abs().max() > 100 * tolerance


def test_packing_puts_eos_between_documents_and_bos_first(tokenizer) -> None:
    blocks = pack_blocks(["Hello world", "The quick brown fox"] * 10, tokenizer, 16)
    assert blocks.shape[1] == 16 and (blocks[:, 0] == tokenizer.bos_token_id).all()
    assert (blocks == tokenizer.eos_token_id).sum() > 0
    with pytest.raises(DataError, match="fewer than one block"):
        pack_blocks(["Hi"], tokenizer, 64)


def test_split_is_seeded_and_deduplicated(corpus) -> None:
    a = split_corpus([corpus], "text", True, 3, 0.1, 200)
    b = split_corpus([corpus], "text", True, 3, 0.1, 200)
    assert a == b and len(set(a.train + a.validation)) == len(a.train + a.validation)
    assert not set(a.train) & set(a.validation)


def test_bad_corpora_fail_clearly(tmp_path, base) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="holds no text"):
        split_corpus([str(empty)], "text", True, 0, 0.1, 10)
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(DataError, match="not a text file"):
        read_documents(binary)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_documents(latin1)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: no string field 'text'"):
        read_documents(jsonl)
    with pytest.raises(DataError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")
    good = tmp_path / "good.txt"
    good.write_text("\n".join(CORPUS * 3))
    with pytest.raises(ConfigError, match="larger than the model's context"):
        run_cpt(base, _cpt(str(good), block_size=4096), tmp_path / "ctx", progress=False)


def test_cpt_cli_runs_and_refuses_to_clobber(base, corpus, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = [
        "cpt",
        "--model",
        base.model,
        "--corpus",
        corpus,
        "--max-steps",
        "2",
        "--block-size",
        "32",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["perplexity_after"]["heldout_lrl"] > 0
    assert (out / "config.yaml").is_file() and (out / "cpt_report.json").is_file()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --resume keeps the run's own settings: a flag that disagrees is refused, naming both values.
    assert main(["cpt", "-o", str(out), "--resume", "--lr", "0.5"]) == 2
    assert "cpt.learning_rate: null -> 0.5" in capsys.readouterr().err
    assert (
        main(
            ["cpt", "--model", base.model, "--corpus", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "x")]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_cpt_cli_interrupted_exits_130_with_a_resume_hint(
    base, corpus, tmp_path, capsys, monkeypatch
) -> None:
    """One exit-code contract: an interrupted run (checkpoint saved) exits 130 like eval and generate,
    not 2 (bad input)."""
    out = tmp_path / "run"
    args = ["cpt", "--model", base.model, "--corpus", corpus, "--max-steps", "4", "--block-size", "32"]
    codes = []
    _interrupted("cpt.step:2", monkeypatch, lambda: codes.append(main([*args, "-o", str(out)])))
    assert codes == [130]
    err = capsys.readouterr().err
    assert "interrupted at step 2/4" in err and "--resume" in err


def test_resume_refuses_a_corpus_whose_content_changed(base, corpus, tmp_path, capsys, monkeypatch) -> None:
    """Resumable commands fingerprint their inputs' content: the same file name with other text is refused
    (training on a mix), while the unchanged corpus resumes."""
    own = tmp_path / "corpus.txt"
    own.write_text(Path(corpus).read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "run"
    args = ["cpt", "--model", base.model, "--corpus", str(own), "--max-steps", "4", "--block-size", "32"]
    codes = []
    _interrupted("cpt.step:2", monkeypatch, lambda: codes.append(main([*args, "-o", str(out)])))
    assert codes == [130]
    capsys.readouterr()
    original = own.read_text(encoding="utf-8")
    own.write_text(original.replace("ئ", "ى", 3), encoding="utf-8")
    assert main(["cpt", "-o", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "changed since the run" in err and str(own) in err, err
    own.write_text(original, encoding="utf-8")
    assert main(["-q", "cpt", "-o", str(out), "--resume"]) == 0


def test_new_rows_start_as_the_mean_of_their_pieces() -> None:
    from trimix.testing import build_model, build_tokenizer
    from trimix.training.vocab import add_tokens, init_new_rows, pieces_of

    tokenizer = build_tokenizer()
    model = build_model("llama", len(tokenizer), seed=2)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    words = [" ئۇيغۇر تىلى", " kitab"]
    pieces = pieces_of(tokenizer, words)
    extended = build_tokenizer()
    ids = add_tokens(extended, words)
    assert ids == [len(tokenizer), len(tokenizer) + 1]
    init_new_rows(model, ids, pieces)
    for new, old in zip(ids, pieces, strict=True):
        torch.testing.assert_close(model.get_input_embeddings().weight[new], old_in[old].mean(0))
        torch.testing.assert_close(model.get_output_embeddings().weight[new], old_out[old].mean(0))
    torch.testing.assert_close(model.get_input_embeddings().weight[: len(tokenizer)], old_in)
    assert extended(" kitab", add_special_tokens=False)["input_ids"] == [ids[1]]


def test_extend_vocab_end_to_end(base, corpus, tmp_path, monkeypatch, capsys) -> None:
    """New tokens are learned, used, trained, saved as a model folder that loads and fuses (at the byte
    level, its tokenizer now differs from the base's), and an interrupted run resumes to the same model."""
    from safetensors.torch import load_file as load_weights

    from trimix.training.vocab import pieces_of

    out = tmp_path / "straight"
    code = main(
        [
            "-q",
            "cpt",
            "--model",
            base.model,
            "--corpus",
            corpus,
            "--extend-vocab",
            "12",
            "--max-steps",
            "6",
            "--block-size",
            "32",
            "--save-every",
            "3",
            "--lr",
            "0.005",
            "-o",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "cpt_report.json").read_text())
    vocab = report["vocabulary"]
    assert vocab["added"] == 12 and vocab["tokens_per_byte_after"] < vocab["tokens_per_byte_before"]
    assert set(report["bits_per_byte_after"]) == {"heldout_lrl", "heldout_hrl"}
    folder = out / "merged"
    assert "tokens per byte" in (folder / "README.md").read_text()
    source = load_source(SourceConfig(model=str(folder), role="small_cpt"))
    base_source = load_source(base.model_copy(update={"weight": 1.0}))
    old = len(base_source.tokenizer)
    assert len(source.tokenizer) == old + 12 and source.logit_rows >= old + 12
    ids = source.tokenizer(CORPUS[4], add_special_tokens=False)["input_ids"]
    assert max(ids) >= old  # the new tokens are used on the language's text
    # Old rows are untouched (LoRA trains only the new rows of the embeddings); new rows moved from
    # their mean-of-pieces start.
    trained = source.model.get_input_embeddings().weight.detach()
    before = base_source.model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(trained[:old], before)
    tokens = json.loads((out / "new_tokens.json").read_text())["tokens"]
    start = torch.stack([before[p].mean(0) for p in pieces_of(base_source.tokenizer, tokens)])
    assert not torch.allclose(trained[old:], start)
    # Fused with its base: the tokenizers differ, so the fusion runs at the byte level.
    from trimix.decoding import SourcePool

    pool = SourcePool([source, base_source.__class__("small_base", base_source.backend, base_source.config)])
    assert pool.space == "bytes"
    # Interrupted at step 2, then resumed: the same model as straight through.
    settings = _cpt(corpus, extend_vocab=12, max_steps=6)
    run_cpt(base, settings, tmp_path / "api", progress=False)
    broken = tmp_path / "broken"
    with pytest.raises(CptInterrupted):
        _interrupted("cpt.step:2", monkeypatch, lambda: run_cpt(base, settings, broken, progress=False))
    run_cpt(base, settings, broken, progress=False, resume=True)
    a = load_weights(tmp_path / "api" / "merged" / "model.safetensors")
    b = load_weights(broken / "merged" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
