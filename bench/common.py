"""Shared set-up for the benchmark scripts: the sources to measure, prompts, timing helpers."""

from __future__ import annotations

import json
import logging
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trimix import FusedLM, load_config
from trimix.backends.loading import Source
from trimix.config import GridRange, SearchConfig
from trimix.data import read_sib200
from trimix.fusion import Fusion
from trimix.search import build_candidates

logger = logging.getLogger("bench")


def machine() -> str:
    """One line describing where the numbers were measured."""
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads"
    )
    return f"{platform.node()} · {platform.processor() or platform.machine()} · {device} · torch {torch.__version__}"


def load_trio(kind: str, device: str = "cpu") -> list[Source]:
    """The three sources to benchmark, each loaded separately (no shared weights).

    ``tiny``: Qwen2 models (hidden 64, 4 layers) whose ``large`` has 8 padded output rows, as
    Qwen2.5-7B vs 1.5B. ``gemma``: three loads of the embedded Gemma 3 270M (the only real model
    offline), which costs what three different 270M models would; ``large`` and ``small_cpt`` get
    seeded noise on their decoder weights so that, like fine-tuned variants, their logits differ
    from ``small_base``'s by a few nats (identical logits would flatter the weight search).
    """
    if kind == "tiny":
        from trimix.testing import save_tiny_trio

        root = Path(tempfile.mkdtemp(prefix="trimix-bench-"))
        paths = save_tiny_trio(root, "qwen2", hidden_size=64, num_layers=4)
        models = [{"model": str(p), "role": r} for r, p in paths.items()]
    elif kind == "gemma":
        models = [{"model": "embedded:gemma-3-270m", "role": r} for r in ("large", "small_cpt", "small_base")]
    else:
        raise SystemExit(f"unknown model kind {kind!r}; use tiny or gemma")
    sources = []
    for m in models:
        config = load_config(
            {"models": [m], "fusion": {"method": "single", "role": m["role"]}, "device": device}
        )
        sources.extend(FusedLM.from_config(config).sources)
    if kind == "gemma":
        for seed, source in enumerate(sources[:2]):
            perturb(source.model, seed)
    return sources


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int, relative: float = 0.05) -> None:
    """Add seeded Gaussian noise (``relative`` x each matrix's std) to the decoder's linear layers."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.get_decoder().modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            noise = torch.randn(weight.shape, generator=generator).to(weight.device, weight.dtype)
            weight.add_(noise.mul_(relative * float(weight.float().std())))


def fused(sources: list[Source], weights: tuple[float, ...]) -> FusedLM:
    """The sources fused with ``weights`` (in order), read as plain weights; weight 0 leaves one out."""
    fusion = Fusion({s.role: w for s, w in zip(sources, weights, strict=True)}, "weighted")
    return FusedLM(sources, fusion)


def demo_paths(kind: str) -> dict[str, str]:
    """Where the demo's sources live, by role.

    ``gemma``: the sources ``trimix demo`` builds (an English-instruction LoRA on Gemma 3 270M as
    ``large``, a Uyghur CPT LoRA as ``small_cpt``, the embedded model as ``small_base``), trained
    once and cached exactly as the demo does. ``tiny``: random Qwen2 models (hidden 64, 4 layers).
    """
    if kind == "gemma":
        from trimix.backends.loading import resolve_cache_dir
        from trimix.demo import DemoBudget, train_cpt_adapter, train_instruct_adapter

        budget, cache = DemoBudget(), resolve_cache_dir(None)
        cpt, _ = train_cpt_adapter(budget, cache, progress=True)
        instruct, _ = train_instruct_adapter(budget, cache, progress=True)
        return {"large": str(instruct), "small_cpt": str(cpt), "small_base": "embedded:gemma-3-270m"}
    if kind == "tiny":
        from trimix.testing import save_tiny_trio

        root = Path(tempfile.mkdtemp(prefix="trimix-bench-"))
        return {r: str(p) for r, p in save_tiny_trio(root, "qwen2", hidden_size=64, num_layers=4).items()}
    raise SystemExit(f"unknown model kind {kind!r}; use tiny or gemma")


def demo_config(kind: str, method: str = "trimix", weights: dict[str, float] | None = None) -> dict:
    """A run config (as a dict) over :func:`demo_paths`; ``weights`` default to the paper's most
    common selection, large 0.1 and small_cpt 0.9."""
    weights = {"large": 0.1, "small_cpt": 0.9} if weights is None else weights
    models = [
        {"model": path, "role": role, **({"weight": weights[role]} if role in weights else {})}
        for role, path in demo_paths(kind).items()
    ]
    return {"models": models, "fusion": {"method": method}}


def demo_trio(kind: str, method: str = "trimix", weights: dict[str, float] | None = None) -> FusedLM:
    """The demo's fused model (see :func:`demo_config`) with every source loaded."""
    return FusedLM.from_config(load_config(demo_config(kind, method, weights)), load_all=True)


def prompts(n: int, lang: str = "uig_Arab", max_chars: int = 160) -> list[str]:
    """Real Uyghur sentences (SIB-200 dev), cut to a length budget so prompt lengths stay comparable."""
    rows = read_sib200(lang, "dev")
    return [r.text[:max_chars] for r in rows[:n]]


def best_time(
    fn: Callable[[], object], repeats: int, reduce: Callable[[list[float]], float] = statistics.median
) -> float:
    """``reduce`` (the median by default) of the wall times of ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return reduce(times)


def weight_matrix(search: SearchConfig, roles: list[str]) -> torch.Tensor:
    """The search's candidate weights as a ``(C, N)`` matrix in ``roles`` order."""
    points, _ = build_candidates(search, roles)
    return torch.tensor([[p[r] for r in roles] for p in points])


# The paper's 6 x 6 TriMix grid is SearchConfig()'s default; this is the 20 x 20 one (400 candidates).
FINE_GRID = SearchConfig(
    grid={
        "large": GridRange(start=0.05, stop=1.0, step=0.05),
        "small_cpt": GridRange(start=0.05, stop=1.0, step=0.05),
    }
)


def save(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        logger.info("wrote %s", path)
