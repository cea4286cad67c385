"""lm-evaluation-harness backend: evaluate any fused model with lm-eval, as ``--model trimix``.

Importing this module registers the model with lm-eval (``import trimix.lm_eval`` before
``lm_eval.simple_evaluate(model="trimix", ...)``); ``trimix lm-eval ...`` does it and then runs lm-eval's
own command line with every option passed through. lm-eval 0.4 discovers no models from other
packages by itself, hence the command.

The backend holds no model logic: it translates lm-eval's requests into calls on a
:class:`~trimix.FusedLM` and back, with lm-eval's own semantics and helpers (the context/continuation
split, the rolling windows, the stop sequences and generation kwargs), so a single-source trimix model
scores exactly as lm-eval's ``hf`` model does. Requests are tokenised with the tokenizer's own special
tokens (lm-eval's default).

``model_args``: ``config=run.yaml`` (required), ``weights=large:0.1|small_cpt:0.9`` (read as
``--weights`` is: a partial set keeps the method's meaning), ``weights_from=selection.json``,
``batch_size``, ``max_length`` (default: the smallest context among the sources), ``device``,
``dtype``, ``engine``.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "evaluating with lm-evaluation-harness needs it installed: pip install 'trimix[lm-eval]'"
    ) from exc

from trimix.config import load_config, parse_weights_arg, read_selected_weights
from trimix.decoding import FusedLM
from trimix.errors import ConfigError

logger = logging.getLogger(__name__)
MODEL_ARGS = ("config", "weights", "weights_from", "batch_size", "max_length", "device", "dtype", "engine")


def _batch_size(value: int | str) -> int:
    """lm-eval's batch size: a positive integer, or ``auto`` (trimix then decodes 8 rows at a time)."""
    text = str(value).strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text.startswith("auto"):
        return 8
    raise ConfigError(
        f"batch_size must be a positive integer or 'auto'; got {value!r} (model_args or --batch_size)"
    )


def parse_weights(text: str) -> dict[str, float]:
    """``large:0.1|small_cpt:0.9`` (lm-eval's model_args split on commas, so pairs use ``|`` and ``:``)."""
    return parse_weights_arg(str(text), pairs="|", assign=":", what="model_args weights")


@register_model("trimix")
class TrimixLM(TemplateLM):
    """A fused model as an lm-evaluation-harness LM (see the module docstring for ``model_args``)."""

    def __init__(
        self,
        config: str | None = None,
        weights: str | None = None,
        weights_from: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        engine: str | None = None,
        lm: FusedLM | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(
                f"unknown trimix model_args {sorted(unknown)}; trimix takes {', '.join(MODEL_ARGS)} "
                "(e.g. --model_args config=run.yaml,weights=large:0.1|small_cpt:0.9)"
            )
        if lm is None:
            if not config:
                raise ConfigError(
                    "trimix needs model_args config=RUN.yaml (the run config naming the sources)"
                )
            if weights and weights_from:
                raise ConfigError("pass either weights= or weights_from= in model_args, not both")
            overrides = {k: v for k, v in {"device": device, "dtype": dtype}.items() if v}
            chosen = (
                parse_weights(weights)
                if weights
                else read_selected_weights(weights_from)
                if weights_from
                else None
            )
            origin = "model_args weights" if weights else f"model_args weights_from ({weights_from})"
            run = load_config(config, overrides=overrides, weights=chosen, weights_origin=origin)
            lm = FusedLM.from_config(run)
        self.chat_roles = [s.role for s in lm.sources if s.config.prompt_format == "chat"]
        self.lm = _reading_raw_text(lm)
        self.tokenizer = lm.tokenizer
        self.engine = engine
        self.batch_size_per_gpu = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length else None
        logger.info("lm-eval backend over %s", lm.fusion.describe())

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> TrimixLM:
        args = simple_parse_args_string(arg_string)
        # lm-eval's own --batch_size applies; its --device (default cuda:0) does not: sources are placed by
        # the run config (per source, or device_map), or by model_args device=.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k == "batch_size"}
        return cls(**{**extra, **args})

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> TrimixLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k == "batch_size"}
        return cls(**{**extra, **arg_dict})

    # ---------------------------------------------------------------- what TemplateLM asks
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        contexts = [s.max_positions for s in self.lm.sources if s.max_positions]
        return min(contexts) if contexts else 2048

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "trimix").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if (
            add_special_tokens is None
        ):  # lm-eval's default: the tokenizer's own specials, unless already there
            add_special_tokens = not has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def _loglikelihood_tokens(
        self, requests: list, disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        pairs = []
        for _, context_enc, continuation_enc in requests:
            whole = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1) :]
            pairs.append((whole, len(continuation_enc)))
        results = self.lm.loglikelihood_tokens(pairs, progress=not disable_tqdm)
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (result.logprob, result.is_greedy))
        return [(r.logprob, r.is_greedy) for r in results]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for window in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, *window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(
            owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True
        ):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), 256)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            settings = {
                "max_new_tokens": int(kwargs.pop("max_gen_toks")),
                "stop": [s for s in until if s],
                "do_sample": bool(kwargs.pop("do_sample", False)),
                "batch_size": self.batch_size_per_gpu,
                "on_context_limit": "stop",
            }
            if settings["do_sample"]:
                settings["temperature"] = float(kwargs.pop("temperature", 1.0) or 1.0)
                settings["top_p"] = float(kwargs.pop("top_p", 1.0) or 1.0)
            if self.engine:
                settings["engine"] = self.engine
            contexts = [requests[i].args[0] for i in indices]
            for i, generation in zip(indices, self.lm.generate(contexts, **settings), strict=True):
                out[i] = generation.text
                self.cache_hook.add_partial("generate_until", requests[i].args, generation.text)
        return out

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render a conversation with the chat template of the sources that read chat (they must agree), or
        of the first source that has one; every source then reads the rendered text."""
        chat = [s for s in self.lm.sources if s.role in self.chat_roles]
        candidates = chat or [s for s in self.lm.sources if getattr(s.tokenizer, "chat_template", None)]
        if not candidates:
            raise ConfigError("--apply_chat_template: no source's tokenizer has a chat template")
        templates = {s.tokenizer.chat_template for s in candidates}
        if len(templates) > 1:
            raise ConfigError(
                f"--apply_chat_template: the sources that read chat ({', '.join(s.role for s in candidates)}) have "
                "different chat templates; render with one of them (prompt_format: chat on one source)"
            )
        return candidates[0].tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def _reading_raw_text(lm: FusedLM) -> FusedLM:
    """The same loaded sources, every one reading the request text as given: lm-eval renders prompts
    itself (with ``--apply_chat_template``, in the chat sources' template), so no source re-wraps them."""
    from trimix.backends.loading import Source
    from trimix.decoding import SourcePool

    if all(s.config.prompt_format == "raw" for s in lm.pool.sources.values()):
        return lm
    raw = [
        Source(s.role, s.backend, s.config.model_copy(update={"prompt_format": "raw"}))
        for s in lm.pool.sources.values()
    ]
    return FusedLM(SourcePool(raw, lm.pool.config, lm.pool.vocab_mode), lm.fusion)


def tasks_dir() -> str:
    """The folder of trimix's lm-eval task YAMLs (bundled SIB-200 languages), for ``--include_path``."""
    from pathlib import Path

    return str(Path(__file__).parent / "lm_eval_tasks")
