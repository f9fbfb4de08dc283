"""Parallel layouts by name, for the benchmarks: 'GPUs + denoiser options' from one readable string.

    "1 GPU" / "sp 1"        one GPU
    "Ulysses N"             sp_degree N, all Ulysses
    "Ring N"                sp_degree N, all ring
    "USP UxR"               sp_degree U*R: Ulysses U x ring R
    "CFG parallel 2"        cfg_parallel (implies true CFG)

followed by any of ", true CFG", ", CUDA graphs", ", eager", ", cuDNN", ", SDPA", ", N chunks" (ulysses_chunks N)
(e.g. "Ulysses 4, eager", "Ulysses 2, 2 chunks").
Without ", CUDA graphs" or ", eager" the denoiser's default applies (`cuda_graphs=auto`, graphs when
sequence-parallel on CUDA: FLUX since 2026-11-26, Qwen-Image since 2026-11-27; the older RESULTS rows ran eager).
Without ", N chunks" the denoiser's `ulysses_chunks` default applies (0, auto, since 2026-11-27: 2 chunks inside
CUDA graphs, else one exchange, which every older RESULTS row ran).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

MODIFIERS = {"CUDA graphs": {"cuda_graphs": "true"}, "eager": {"cuda_graphs": "false"},
             "cuDNN": {"attention_backend": "cudnn"},
             "SDPA": {"attention_backend": "sdpa"}}


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    options: dict  # denoiser options (DenoiserOptions fields)
    true_cfg: bool

    @property
    def gpus(self) -> int:
        return self.options.get("sp_degree", 1) * (2 if self.options.get("cfg_parallel") else 1)


def chunks_modifier(mod: str) -> Optional[int]:
    """N of the modifier "N chunks" (ulysses_chunks N), None for any other text (bench_parallel_wan.py's
    layouts take it too)."""
    m = re.fullmatch(r"(\d+) chunks?", mod.strip())
    return int(m[1]) if m else None


def parse_layout(name: str) -> Layout:
    base, *mods = [part.strip() for part in name.split(",")]
    options: dict = {}
    true_cfg = False
    if base in ("1 GPU", "sp 1"):
        pass
    elif base == "CFG parallel 2":
        options["cfg_parallel"], true_cfg = True, True
    elif m := re.fullmatch(r"(Ulysses|Ring) (\d+)", base):
        n = int(m[2])
        options.update(sp_degree=n, **({"ring_degree": n} if m[1] == "Ring" else {"ulysses_degree": n}))
    elif m := re.fullmatch(r"USP (\d+)x(\d+)", base):
        u, r = int(m[1]), int(m[2])
        options.update(sp_degree=u * r, ulysses_degree=u, ring_degree=r)
    else:
        raise ValueError(f"layout {name!r}: expected '1 GPU', 'Ulysses N', 'Ring N', 'USP UxR' or 'CFG parallel 2', "
                         f"then any of ', true CFG', {', '.join(repr(', ' + k) for k in MODIFIERS)}, ', N chunks'")
    for mod in mods:
        if mod == "true CFG":
            true_cfg = True
        elif mod in MODIFIERS:
            options.update(MODIFIERS[mod])
        elif (chunks := chunks_modifier(mod)) is not None:
            options["ulysses_chunks"] = chunks
        else:
            raise ValueError(f"layout {name!r}: unknown modifier {mod!r}")
    return Layout(name, options, true_cfg)
