"""Continual pretraining (CPT) of the small model on raw low-resource-language text.

Training runs on transformers' ``Trainer`` (optimiser, schedule, accumulation, checkpoints, exact
resume of data order / optimiser / scheduler / RNG) with a PEFT LoRA adapter by default. trimix adds
the corpus handling, a Ctrl-C that saves a checkpoint before exiting, before/after perplexity on
held-out text of the language and of a high-resource language (a forgetting check), and an output
folder that ``trimix generate`` loads as a source.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed
from transformers.trainer_callback import PrinterCallback

from trimix.backends.hf import HFBackend
from trimix.backends.loading import SOURCE_CARD, Source, load_source, peft_without_checkpointing_warning
from trimix.config import CptConfig, SourceConfig
from trimix.data import read_text_spec
from trimix.errors import ConfigError, Interrupted
from trimix.faults import SimulatedKill, fault_point
from trimix.io import atomic_write_json
from trimix.search.scoring import FusedPerplexityScorer, ScoringText
from trimix.training.corpus import BlockDataset, pack_blocks, split_corpus
from trimix.training.vocab import (
    add_tokens,
    init_new_rows,
    learn_tokens,
    pieces_of,
    token_modules,
    tokens_per_byte,
)

logger = logging.getLogger(__name__)

# Family defaults for LoRA targets: every attention projection. Families not listed use PEFT's own default.
LORA_TARGETS = {
    family: ["q_proj", "k_proj", "v_proj", "o_proj"]
    for family in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "gemma3")
}


class CptInterrupted(Interrupted):
    """Training stopped on Ctrl-C after saving a checkpoint."""


@dataclass
class CptReport:
    """What a CPT run did and measured; also written to ``cpt_report.json`` and the model card."""

    base: dict[str, Any]
    method: str
    corpus: dict[str, Any]
    steps: int
    tokens_seen: int
    block_size: int
    wall_seconds: float
    perplexity_before: dict[str, float]
    perplexity_after: dict[str, float]
    output: str
    resumed_from: str | None = None
    train_loss: list[float] = field(default_factory=list)
    # bits per byte on the same held-out text: comparable across tokenizers (perplexity per token is not)
    bits_per_byte_before: dict[str, float] = field(default_factory=dict)
    bits_per_byte_after: dict[str, float] = field(default_factory=dict)
    vocabulary: dict[str, Any] | None = None  # --extend-vocab: what was added, tokens per byte before/after

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def held_out_perplexity(source: Source, texts: list[str]) -> float:
    """Token-level perplexity of one model on texts (each scored from its BOS), via the search scorer."""
    return held_out_scores(source, texts)[0]


def held_out_scores(source: Source, texts: list[str]) -> tuple[float, float]:
    """Perplexity per token and bits per UTF-8 byte of one model on texts (each scored from its BOS)."""
    items = [ScoringText(f"t{i}", t) for i, t in enumerate(texts)]
    scorer = FusedPerplexityScorer([source], len(source.tokenizer), items, progress=False)
    totals = scorer.score(torch.ones(1, 1))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return float(totals.perplexity[0]), float(totals.nll[0]) / max(1, n_bytes) / math.log(2)


def _measure(source: Source, lrl: list[str], hrl: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Held-out perplexity and bits per byte, on the language of the corpus and the forgetting text."""
    ppl, bpb = {}, {}
    for key, texts in (("heldout_lrl", lrl), ("heldout_hrl", hrl)):
        if texts:
            ppl[key], bpb[key] = held_out_scores(source, texts)
    return ppl, bpb


@dataclass
class _Extension:
    tokenizer: Any
    new_ids: list[int]
    pieces: list[list[int]]
    summary: dict[str, Any]


def _extend_vocabulary(
    source: Source, texts: list[str], heldout: list[str], count: int, out_dir: Path
) -> _Extension:
    """The base tokenizer with ``count`` new tokens learned from ``texts`` (kept in ``new_tokens.json`` so
    that ``--resume`` rebuilds the same model), and what they change on held-out text."""
    saved = out_dir / "new_tokens.json"
    if saved.is_file():
        tokens = json.loads(saved.read_text(encoding="utf-8"))["tokens"]
    else:
        tokens = learn_tokens(texts, source.tokenizer, count)
        atomic_write_json(saved, {"tokens": tokens})
    tokenizer = copy.deepcopy(source.tokenizer)
    new_ids = add_tokens(tokenizer, tokens)
    before, after = tokens_per_byte(source.tokenizer, heldout), tokens_per_byte(tokenizer, heldout)
    logger.info(
        "extended the vocabulary by %d tokens: held-out tokens per byte %.4f -> %.4f (%.1f%% fewer)",
        len(tokens),
        before,
        after,
        100 * (1 - after / before),
    )
    summary = {
        "added": len(tokens),
        "first_ids": [new_ids[0], new_ids[-1]] if new_ids else [],
        "examples": tokens[:20],
        "tokens_per_byte_before": before,
        "tokens_per_byte_after": after,
        "init": "mean of the base tokenizer's pieces (input and untied output rows)",
    }
    return _Extension(tokenizer, new_ids, pieces_of(source.tokenizer, tokens), summary)


def forgetting_texts(spec: str | None, limit: int = 100) -> list[str]:
    """High-resource text for the forgetting check: ``sib200:LANG:SPLIT`` or a text file."""
    return read_text_spec(spec, limit) if spec else []


class _Progress(TrainerCallback):
    """One progress bar with loss, learning rate and tokens/s; also remembers the loss curve."""

    def __init__(self, tokens_per_step: int, enabled: bool) -> None:
        self.tokens_per_step = tokens_per_step
        self.enabled = enabled
        self.losses: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(
            total=state.max_steps,
            initial=state.global_step,
            desc="cpt",
            unit="step",
            disable=not self.enabled,
        )
        self.start, self.start_step = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"{(state.global_step - self.start_step) * self.tokens_per_step / elapsed:.0f} tok/s",
            refresh=False,
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            logger.debug("step %d: %s", state.global_step, logs)
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{logs.get('learning_rate', 0):.2e}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


COMPLETE = "trimix_complete"  # written into a checkpoint folder once every file of it is on disk


class _StopOnSignal(TrainerCallback):
    """Turn Ctrl-C (or SIGTERM) into 'save a checkpoint at the end of this step, then stop'; mark saved
    checkpoints complete; and honour the ``cpt.step`` / ``cpt.checkpoint`` fault points (trimix.faults)."""

    def __init__(self) -> None:
        self.requested = False

    def request(self, *_: object) -> None:
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "interrupt: saving a checkpoint after this step (Ctrl-C again to abort without saving)"
        )

    def on_step_end(self, args, state, control, **kwargs):
        if fault_point("cpt.step"):
            self.request()  # exactly what Ctrl-C does
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        if control.should_save and fault_point("cpt.checkpoint"):
            # A kill while the checkpoint is written leaves a folder with some of its files.
            partial = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            partial.mkdir(parents=True, exist_ok=True)
            (partial / "adapter_model.safetensors").write_bytes(b"")
            raise SimulatedKill("fault injected at cpt.checkpoint")
        return control

    def on_save(self, args, state, control, **kwargs):
        (Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE).write_text("ok\n")
        return control


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint whose every file was written; incomplete ones (a kill mid-save) are skipped
    with a warning."""
    if not folder.is_dir():
        return None
    found = sorted(
        (p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for candidate in reversed(found):
        if (candidate / COMPLETE).is_file():
            return str(candidate)
        logger.warning("ignoring the incomplete checkpoint %s (interrupted while it was written)", candidate)
    return None


def checkpointing_keyword() -> str:
    """``TrainingArguments``' name for activation (gradient) checkpointing.

    transformers renamed ``gradient_checkpointing`` to ``activation_checkpointing`` during 5.x (5.25 keeps the old
    name as an alias that warns with a FutureWarning; 5.17 knows only the old one), so look for the new field.
    """
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def _lora_targets(model: torch.nn.Module, settings: list[str] | None) -> list[str] | None:
    if settings:
        return settings
    return LORA_TARGETS.get(model.config.model_type)


def run_cpt(
    base: SourceConfig,
    cpt: CptConfig,
    out_dir: Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> CptReport:
    """Continually pretrain ``base`` on ``cpt.corpus`` and save an adapter (or model) that loads as a source.

    Args:
        base: the small model to train (a source config; GGUF, hub id, folder or embedded name).
        cpt: the training settings.
        out_dir: the run folder: ``checkpoints/``, ``adapter/`` (or ``model/``, ``merged/``), the report.
        dtype: master weight dtype; float32 unless set (bf16 autocast is used on GPUs that support it).
        device: where to train.
        cache_dir: GGUF conversion cache.
        resume: continue from the newest checkpoint in ``out_dir/checkpoints``.
        progress: show the progress bar.

    Returns:
        The :class:`CptReport`.

    Raises:
        DataError: corpus problems. ConfigError: block size larger than the context, nothing to resume.
        CptInterrupted: stopped by Ctrl-C after saving a checkpoint.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = split_corpus(
        cpt.corpus, cpt.text_field, cpt.dedup, cpt.seed, cpt.validation_fraction, cpt.max_validation_lines
    )
    source = load_source(
        base.model_copy(update={"weight": 1.0}),
        default_dtype=dtype,
        default_device=device,
        cache_dir=cache_dir,
    )
    extension = None
    if cpt.extend_vocab:
        extension = _extend_vocabulary(source, split.train, split.validation, cpt.extend_vocab, out_dir)
    tokenizer = extension.tokenizer if extension else source.tokenizer
    context = source.max_positions
    if context is not None and cpt.block_size > context:
        raise ConfigError(
            f"cpt.block_size {cpt.block_size} is larger than the model's context of {context} tokens"
        )
    blocks = pack_blocks(split.train, tokenizer, cpt.block_size)
    hrl = forgetting_texts(cpt.forgetting_text, cpt.max_forgetting_lines)
    checkpoints = out_dir / "checkpoints"
    last = last_complete_checkpoint(checkpoints)
    if resume and last is None:
        raise ConfigError(f"--resume: no complete checkpoint in {checkpoints}; start afresh with --overwrite")
    report_path = out_dir / "cpt_report.json"
    saved_report = json.loads(report_path.read_text()) if resume and report_path.is_file() else {}
    before = saved_report.get("perplexity_before")
    bpb_before = saved_report.get("bits_per_byte_before", {})
    if before is None:
        logger.info("measuring perplexity before training on %d held-out lines", len(split.validation))
        before, bpb_before = _measure(source, split.validation, hrl)
        _write_json(
            report_path,
            {"perplexity_before": before, "bits_per_byte_before": bpb_before, "status": "training"},
        )

    model = source.model
    set_seed(cpt.seed)  # the adapter's random init must not depend on what ran before in this process
    token_rows = {}
    if extension is not None:
        init_new_rows(model, extension.new_ids, extension.pieces)
        token_rows = {name: extension.new_ids for name in token_modules(model)}
    if cpt.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = _lora_targets(model, cpt.lora.target_modules)
        lora = LoraConfig(
            task_type="CAUSAL_LM",
            r=cpt.lora.r,
            lora_alpha=cpt.lora.alpha,
            lora_dropout=cpt.lora.dropout,
            target_modules=targets,
            trainable_token_indices=token_rows or None,  # the new tokens' rows train too
        )
        with peft_without_checkpointing_warning():
            model = get_peft_model(model, lora)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("LoRA on %s: %d trainable parameters", targets or "PEFT's default modules", trainable)
    else:
        model.requires_grad_(True)
    steps = cpt.steps()
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported() and device != "cpu"
    args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=cpt.batch_size,
        gradient_accumulation_steps=cpt.grad_accum,
        learning_rate=cpt.lr(),
        lr_scheduler_type=cpt.lr_scheduler,
        warmup_steps=round(cpt.warmup_ratio * steps),
        weight_decay=cpt.weight_decay,
        max_steps=steps,
        save_strategy="steps",
        save_steps=cpt.save_every,
        save_total_limit=2,
        logging_steps=max(1, min(10, steps // 10)),
        seed=cpt.seed,
        data_seed=cpt.seed,
        report_to="none",
        use_cpu=device == "cpu",
        bf16=use_bf16,
        **{checkpointing_keyword(): cpt.gradient_checkpointing},
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    tokens_per_step = cpt.batch_size * cpt.grad_accum * cpt.block_size
    progress_cb = _Progress(tokens_per_step, progress)
    stopper = _StopOnSignal()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=BlockDataset(blocks),
        data_collator=default_data_collator,
        callbacks=[progress_cb, stopper],
    )
    # With its own bar disabled, Trainer prints every log dict to stdout; ours reports them instead.
    trainer.remove_callback(PrinterCallback)
    previous = {sig: signal.signal(sig, stopper.request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer.train(resume_from_checkpoint=last if resume else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopper.requested:
        raise CptInterrupted(
            f"interrupted at step {trainer.state.global_step}/{steps}; checkpoint saved in {checkpoints}. "
            "Run the same command with --resume to continue."
        )
    model.eval()
    trained = Source(source.role, HFBackend(model, tokenizer), source.config)
    after, bpb_after = _measure(trained, split.validation, hrl)
    output = _save_result(model, tokenizer, base, cpt, out_dir)
    report = CptReport(
        base=base.model_dump(exclude_none=True, include={"model", "gguf_file", "revision"}),
        method=cpt.method,
        corpus={
            "files": split.sources,
            "train_documents": len(split.train),
            "validation_documents": len(split.validation),
            "duplicates_removed": split.duplicates_removed,
            "train_blocks": int(blocks.shape[0]),
            "forgetting_text": cpt.forgetting_text,
        },
        steps=trainer.state.global_step,
        tokens_seen=trainer.state.global_step * tokens_per_step,
        block_size=cpt.block_size,
        wall_seconds=time.perf_counter() - start,
        perplexity_before=before,
        perplexity_after=after,
        output=str(output),
        resumed_from=last if resume else None,
        train_loss=progress_cb.losses,
        bits_per_byte_before=bpb_before,
        bits_per_byte_after=bpb_after,
        vocabulary=extension.summary if extension else None,
    )
    _write_json(report_path, {**report.to_dict(), "status": "done"})
    _write_card(output, report)
    return report


def _save_result(model, tokenizer, base: SourceConfig, cpt: CptConfig, out_dir: Path) -> Path:
    if cpt.method == "lora" and not cpt.merge and not cpt.extend_vocab:
        target = out_dir / "adapter"
        model.save_pretrained(target)
        # How to load the base again: the user's own model string (e.g. embedded:gemma-3-270m), not a cache path.
        base_info = base.model_dump(exclude_none=True, include={"model", "gguf_file", "revision"})
        _write_json(target / SOURCE_CARD, {"base": base_info})
    else:
        # An extended vocabulary changes the base's embeddings: the result is a whole model folder.
        target = out_dir / ("merged" if cpt.method == "lora" else "model")
        plain = model.merge_and_unload() if cpt.method == "lora" else model
        plain.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _write_card(folder: Path, report: CptReport) -> None:
    b, a = report.perplexity_before, report.perplexity_after
    lines = [
        "# trimix continual-pretraining result",
        "",
        f"- base: `{report.base.get('model')}`; method: {report.method}",
        f"- corpus: {', '.join(report.corpus['files'])} ({report.corpus['train_documents']} training documents, "
        f"{report.corpus['validation_documents']} held out, {report.corpus['duplicates_removed']} duplicates removed)",
        f"- steps: {report.steps}; tokens: {report.tokens_seen:,}; block size {report.block_size}; "
        f"wall time {report.wall_seconds:.0f} s",
        f"- held-out perplexity (language of the corpus): {b['heldout_lrl']:.2f} -> {a['heldout_lrl']:.2f}",
    ]
    if report.bits_per_byte_before:
        lines.append(
            f"- held-out bits per byte: {report.bits_per_byte_before['heldout_lrl']:.4f} -> "
            f"{report.bits_per_byte_after.get('heldout_lrl', float('nan')):.4f}"
        )
    if report.vocabulary:
        v = report.vocabulary
        lines.append(
            f"- vocabulary: +{v['added']} tokens; held-out tokens per byte {v['tokens_per_byte_before']:.4f} -> "
            f"{v['tokens_per_byte_after']:.4f}"
        )
    if "heldout_hrl" in b:
        lines.append(
            f"- forgetting check ({report.corpus['forgetting_text']}): {b['heldout_hrl']:.2f} -> "
            f"{a['heldout_hrl']:.2f}"
        )
    lines += ["", "Load it as a fusion source: `{model: " + str(folder) + ", role: small_cpt}`."]
    (folder / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_json(path, payload)
