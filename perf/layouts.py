"""Parallel layouts by name, for the benchmarks: 'GPUs + denoiser options' from one readable string.

    "1 GPU" / "sp 1"        one GPU
    "Ulysses N"             sp_degree N, all Ulysses
    "Ring N"                sp_degree N, all ring
    "USP UxR"               sp_degree U*R: Ulysses U x ring R
    "CFG parallel 2"        cfg_parallel (implies true CFG); "CFG 2" the same
    "CFG parallel 2 x L"    cfg_parallel, each branch on a group of layout L above (e.g. "CFG 2 x Ulysses 2": 4 GPUs)

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
    def sp_degree(self) -> int:
        return self.options.get("sp_degree", 1)

    @property
    def ring_degree(self) -> int:
        return self.options.get("ring_degree", 1)

    @property
    def ulysses_degree(self) -> int:
        return self.sp_degree // self.ring_degree

    @property
    def cfg_parallel(self) -> bool:
        return self.options.get("cfg_parallel", False)

    @property
    def ulysses_chunks(self) -> int:
        return self.options.get("ulysses_chunks", 0)  # the denoisers' default: 0 (auto)

    @property
    def gpus(self) -> int:
        return self.sp_degree * (2 if self.cfg_parallel else 1)


def _sp_options(text: str) -> Optional[dict]:
    """The sequence-parallel options of '1 GPU' / 'sp 1', 'Ulysses N', 'Ring N' or 'USP UxR'; None for other text."""
    if text in ("1 GPU", "sp 1"):
        return {}
    if m := re.fullmatch(r"(Ulysses|Ring) (\d+)", text):
        n = int(m[2])
        return dict(sp_degree=n, **({"ring_degree": n} if m[1] == "Ring" else {"ulysses_degree": n}))
    if m := re.fullmatch(r"USP (\d+)x(\d+)", text):
        u, r = int(m[1]), int(m[2])
        return dict(sp_degree=u * r, ulysses_degree=u, ring_degree=r)
    return None


def parse_layout(name: str) -> Layout:
    base, *mods = [part.strip() for part in name.split(",")]
    cfg = re.fullmatch(r"CFG (?:parallel )?2(?: x (.+))?", base)
    options = _sp_options((cfg[1] or "sp 1") if cfg else base)
    if options is None:
        raise ValueError(f"layout {name!r}: expected '1 GPU', 'Ulysses N', 'Ring N', 'USP UxR', 'CFG parallel 2' or "
                         f"'CFG parallel 2 x ' one of the first four, then any of ', true CFG', "
                         f"{', '.join(repr(', ' + k) for k in MODIFIERS)}, ', N chunks'")
    true_cfg = bool(cfg)
    if cfg:
        options["cfg_parallel"] = True
    for mod in mods:
        if mod == "true CFG":
            true_cfg = True
        elif mod in MODIFIERS:
            options.update(MODIFIERS[mod])
        elif m := re.fullmatch(r"(\d+) chunks?", mod):
            options["ulysses_chunks"] = int(m[1])
        else:
            raise ValueError(f"layout {name!r}: unknown modifier {mod!r}")
    return Layout(name, options, true_cfg)
