"""A LoRA adapter merged into a GGUF file, for sources that llama.cpp runs (``backend: llama_cpp``).

The demo's CPT and instruction sources are PEFT LoRA adapters over a quantized GGUF base. llama.cpp
runs them from one file derived from the base: its metadata and every tensor the adapter does not touch
are copied byte for byte (still quantized), and each weight it does touch is written as
``W + (alpha / r) B A`` at the stated precision (``f16`` by default, ``f32`` on request), ``W``
dequantised from the base. Attention projections are laid out as llama.cpp's converter lays them out
(rows of queries and keys permuted for the ``llama`` architecture's rotary layout; other architectures
supported here keep transformers' layout).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from trimix.errors import SourceLoadError

logger = logging.getLogger(__name__)

# PEFT module names -> llama.cpp tensor names (per layer).
MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
PERMUTED = {"llama"}  # architectures whose converter permutes query/key rows
UNPERMUTED = {
    "gemma",
    "gemma2",
    "gemma3",
    "qwen2",
    "qwen3",
}  # NEOX rotary: rows kept as transformers has them
PRECISIONS = {"f16": np.float16, "f32": np.float32}


def merged_gguf(base: Path, adapter_dir: Path, cache_dir: Path, precision: str = "f16") -> Path:
    """The base file with the adapter merged in, written once into ``cache_dir/gguf`` and reused."""
    stamp = [
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in (base, *sorted(adapter_dir.glob("adapter_*")))
    ]
    key = hashlib.sha1(
        "|".join([str(base.resolve()), str(adapter_dir.resolve()), precision, *stamp]).encode()
    ).hexdigest()[:12]
    target = cache_dir / "gguf" / f"{base.stem}-{adapter_dir.name}-{key}-{precision}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        merge_lora(base, adapter_dir, staging, precision)
        staging.rename(target)
    finally:
        if staging.exists():
            staging.unlink()
    logger.info("merged adapter %s into %s (%s): %s", adapter_dir, base.name, precision, target)
    return target


def merge_lora(base: Path, adapter_dir: Path, out: Path, precision: str = "f16") -> None:
    """Write ``base`` with the PEFT LoRA adapter in ``adapter_dir`` merged in to ``out`` (see the module
    docstring). Raises SourceLoadError for an adapter kind or architecture this cannot merge exactly."""
    import gguf
    from safetensors.torch import load_file

    if precision not in PRECISIONS:
        raise SourceLoadError(f"merge precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise SourceLoadError(f"{adapter_dir}: a LoRA adapter with {flag} cannot be merged into GGUF yet")
    if config.get("modules_to_save"):
        raise SourceLoadError(
            f"{adapter_dir}: adapters that save whole modules cannot be merged into GGUF yet"
        )
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / (rank**0.5 if config.get("use_rslora") else rank)
    reader = gguf.GGUFReader(str(base))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    if arch not in PERMUTED | UNPERMUTED:
        raise SourceLoadError(f"{base.name}: merging adapters into a {arch!r} GGUF is not supported yet")
    deltas = _deltas(load_file(str(adapter_dir / "adapter_model.safetensors")), scale)
    heads = {
        "attn_q": _field(reader, f"{arch}.attention.head_count"),
        "attn_k": _field(reader, f"{arch}.attention.head_count_kv"),
    }
    writer = gguf.GGUFWriter(str(out), arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    data = []
    for tensor in reader.tensors:
        delta = deltas.pop(tensor.name, None)
        if delta is None:
            writer.add_tensor_info(
                tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
            )
            data.append(tensor.data)
            continue
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        kind = tensor.name.split(".")[2]
        if arch in PERMUTED and kind in heads:
            delta = _permute(delta, heads[kind])
        if weight.shape != tuple(delta.shape):
            raise SourceLoadError(
                f"{adapter_dir}: the update of {tensor.name} has shape {tuple(delta.shape)}, the weight {weight.shape}"
            )
        merged = (weight + delta.numpy()).astype(PRECISIONS[precision])
        writer.add_tensor_info(tensor.name, merged.shape, merged.dtype, merged.nbytes)
        data.append(merged)
    if deltas:
        raise SourceLoadError(
            f"{adapter_dir}: the adapter changes {sorted(deltas)[:3]}, which {base.name} does not hold"
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for array in data:
        writer.write_tensor_data(array, tensor_endianess=reader.endianess)
    writer.close()


def _deltas(weights: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """llama.cpp tensor name -> ``scale * B @ A`` (float32, transformers' (out, in) layout)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in weights.items():
        stem, _, kind = name.rpartition(".lora_")
        pairs.setdefault(stem, {})[kind.split(".")[0]] = value.float()
    deltas = {}
    for stem, pair in pairs.items():
        parts = stem.split(".")
        layer = parts[parts.index("layers") + 1]
        module = ".".join(parts[parts.index("layers") + 2 :])
        if module not in MODULES or set(pair) != {"A", "B"}:
            raise SourceLoadError(f"cannot merge the adapter weights of {stem!r} into GGUF")
        deltas[f"blk.{layer}.{MODULES[module]}.weight"] = scale * (pair["B"] @ pair["A"])
    return deltas


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotary halves -> llama.cpp's interleaved pairs (rows of each head)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _field(reader: object, name: str) -> int:
    field = reader.fields.get(name)
    if field is None:
        return 0
    value = field.contents()
    return int(value[0] if isinstance(value, list) else value)
