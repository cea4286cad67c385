"""Tiny random-initialised models and a tokenizer trained in memory, for tests and benchmarks.

Everything here is offline: a BPE tokenizer (about 200 tokens) is trained on a few English and
Uyghur sentences, and Qwen2 / Llama / Gemma3 models are built from configs. A ``large`` model can get
extra, padded output rows, as Qwen2.5-7B has 152,064 rows for the 151,665-token tokenizer that
Qwen2.5-1.5B pads to 151,936.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a small test of fused decoding.",
    "Topic: science, travel, politics, sports, health, entertainment, geography.",
    "Translate the sentence into English. Answer:",
    "ئۇيغۇر تىلى تۈركىي تىللار ئائىلىسىگە مەنسۇپ.",
    "بۈگۈن ھاۋا ناھايىتى ياخشى، بىز باغچىغا باردۇق.",
    "مەكتەپتە ئوقۇغۇچىلار كىتاب ئوقۇدى.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and letters A B C D.",
]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_tokenizer(vocab_size: int = 200, corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer (Metaspace pre-tokenizer, ``<bos>`` prepended) trained in memory."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator((corpus or CORPUS) * 3, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_byte_level_tokenizer(
    vocab_size: int = 400, corpus: list[str] | None = None, eos: str = "<eos>"
) -> PreTrainedTokenizerFast:
    """A small byte-level BPE (Qwen2 / Llama 3 style: every byte is a token) trained in memory.

    Scripts absent from the corpus fall back to one token per UTF-8 byte: a Tibetan letter is three tokens,
    as under English-centric tokenizers. ``eos``: its end-of-sequence token's spelling (GGUF readers of
    byte-level vocabularies expect GPT-2's ``<|endoftext|>``).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [eos if t == "<eos>" else t for t in SPECIALS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or CORPUS) * 3, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token=eos, pad_token="<pad>", unk_token="<unk>"
    )


def build_byte_fallback_tokenizer(
    vocab_size: int = 120, corpus: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """A small SentencePiece-style BPE with byte fallback (Gemma / Llama 2 style): ``▁`` for spaces,
    pieces learned from the corpus, and ``<0x00>``..``<0xFF>`` for every byte no piece covers (a
    Tibetan letter outside the corpus is three byte pieces)."""
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Replace(" ", "\u2581")
    learner.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    learner.train_from_iterator((corpus or CORPUS) * 3, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_model(
    arch: str,
    vocab_rows: int,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    sliding_window: int = 6,
    init_std: float = 0.3,
    rope_theta: float | None = None,
) -> PreTrainedModel:
    """A random causal LM of family ``arch`` (qwen2, llama or gemma3) with ``vocab_rows`` output rows
    (``rope_theta``: the rotary base, default the family's)."""
    common = dict(
        vocab_size=vocab_rows,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if rope_theta is not None:
        common["rope_theta"] = rope_theta
    if arch == "qwen2":
        cls, config = Qwen2ForCausalLM, Qwen2Config(**common)
    elif arch == "llama":
        cls, config = LlamaForCausalLM, LlamaConfig(**common)
    elif arch == "gemma3":
        # A short sliding window so that prompts overflow it and the sliding-window cache layers work.
        layer_types = ["sliding_attention", "full_attention"] * (num_layers // 2) + ["sliding_attention"] * (
            num_layers % 2
        )
        config = Gemma3TextConfig(
            **common, head_dim=hidden_size // 4, sliding_window=sliding_window, layer_types=layer_types
        )
        cls = Gemma3ForCausalLM
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use qwen2, llama or gemma3")
    torch.manual_seed(seed)
    model = cls(config)
    # Larger-than-default random weights make the logits peaked enough that sources disagree.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, init_std)
    return model.eval()


def save_tiny_model(
    folder: Path, arch: str, tokenizer: PreTrainedTokenizerFast, seed: int, extra_rows: int = 0, **kwargs
) -> Path:
    """Build and save a tiny model with ``len(tokenizer) + extra_rows`` output rows, plus the tokenizer."""
    model = build_model(arch, len(tokenizer) + extra_rows, seed=seed, **kwargs)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_trio(root: Path, arch: str = "qwen2", padded_rows: int = 8, **kwargs) -> dict[str, Path]:
    """large (``padded_rows`` extra output rows), small_cpt and small_base tiny models sharing one
    tokenizer, under ``root``."""
    tokenizer = build_tokenizer()
    plan = {"large": (1, padded_rows), "small_cpt": (2, 0), "small_base": (3, 0)}
    return {
        role: save_tiny_model(root / role, arch, tokenizer, seed=seed, extra_rows=extra, **kwargs)
        for role, (seed, extra) in plan.items()
    }


def build_chain_model(
    tokenizer: PreTrainedTokenizerFast,
    chain: dict[int, int],
    seed: int = 0,
    hidden_size: int = 64,
    scale: float = 4.0,
) -> PreTrainedModel:
    """A tiny Llama whose next token is ``chain[last token]``: every layer's output projections are zero
    (the residual stream is the last token's embedding) and the output row of ``y`` is the sum of the
    normalised embeddings of the tokens ``x`` with ``chain[x] == y``, times ``scale``. Used to make a model
    certain to emit a given text (a stop string, an end-of-sequence id) after a given prompt.
    """
    model = build_model("llama", len(tokenizer), seed=seed, hidden_size=hidden_size, num_layers=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embeddings = model.model.embed_tokens.weight
        unit = embeddings / embeddings.norm(dim=-1, keepdim=True)
        head = torch.zeros_like(model.lm_head.weight)
        for source, target in chain.items():
            head[target] += unit[source]
        model.lm_head.weight.copy_(head * scale * hidden_size**0.5)
    return model.eval()


def save_tiny_gguf(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> Path:
    """Write a tiny Llama and its byte-level BPE as a float32 GGUF file, as llama.cpp's converter lays one
    out (the ``llama`` architecture's keys and tensor names, query and key rows permuted for its rotary
    layout, the tokenizer as ``gpt2`` tokens, types and merges), so llama.cpp and transformers' GGUF
    reader load the same model offline."""
    import json

    import gguf
    import numpy as np

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    rope = getattr(config, "rope_theta", None) or (config.rope_parameters or {}).get("rope_theta", 10000.0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("trimix tiny llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope))
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for piece, index in vocab.items():
        tokens[index] = piece
    specials = set(tokenizer.all_special_ids)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name of GPT-2's split (the byte-level default)
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL for i in range(len(tokens))]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(True)

    def permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:  # HF's rotary halves -> llama.cpp pairs
        return (
            weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape)
        )

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, weight in model.state_dict().items():
        weight = weight.detach().float()
        if name in names:
            target = names[name]
        else:
            _, _, layer, *rest = name.split(".")
            module = ".".join(rest[:-1])
            target = f"blk.{layer}.{per_layer[module]}.weight"
            if module == "self_attn.q_proj":
                weight = permute(weight, heads)
            elif module == "self_attn.k_proj":
                weight = permute(weight, kv_heads)
        writer.add_tensor(target, np.ascontiguousarray(weight.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
