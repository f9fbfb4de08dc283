"""Attention throughput on a CUDA GPU: ditserve's Triton kernels against torch SDPA (cuDNN, flash).

    python3 perf/bench_attention.py [--out DIR] [--quick]
    python3 perf/bench_attention.py --step flux,qwen-image,wan-14b [--step-backends ...] [--out DIR]  # diffusers
    TRITON_INTERPRET=1 python3 perf/bench_attention.py --step qwen-image,wan-14b --tiny --device cpu  # smoke test
    python3 perf/bench_attention.py --flux-step [--out DIR]     # = --step flux
    python3 perf/bench_attention.py --compile-check [--quick]   # no GPU: sm_90 cross-compile + ptxas -v
    python3 perf/bench_attention.py --host [--out DIR]          # host time of one attention call

For each shape (B, H, L, D), bf16, random inputs: TFLOP/s = 4 * B * H * L^2 * D / median time
(triton.testing.do_bench). Ours run on (B, L, H, D) tensors, the layout diffusers' processors hold;
SDPA runs on contiguous (B, H, L, D), its best case. The quantised kernel is timed on pre-quantised
inputs (int8 Q.K^T default, and all-e4m3), and end to end with the Triton quantisation passes. Then the
fused RMSNorm+RoPE prologue on the FLUX shape against diffusers' separate ops + cuDNN SDPA.
Writes bench_attention.json to --out; prints a table last.

--step: one transformer step of FLUX.1-dev, Qwen-Image (20.4B) and/or Wan2.1-T2V-14B at full size (random
bf16 weights built on the GPU, one model at a time: 24, 41 and 29 GB) per attention backend, each backend
through the model's processor (ditserve.kernels.*_processor), as the denoisers' attention_backend runs it.
Writes bench_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from ditserve.kernels import attention as A
from ditserve.kernels import attention_fp8 as A8
from ditserve.kernels import attention_hopper as AH
from ditserve.kernels import attention_hopper_fp8 as AHF
from ditserve.kernels.attention import Prologue, attention
from ditserve.kernels.attention_fp8 import attention_fp8, attention_fp8_quantized, quantize_fp8

SHAPES = [(1, 24, 4608, 128), (1, 24, 4352, 128), (2, 24, 4608, 128), (1, 40, 32760, 128), (1, 12, 32760, 128)]


def tflops(B: int, H: int, L: int, D: int, ms: float) -> float:
    return 4.0 * B * H * L * L * D / (ms * 1e-3) / 1e12


def bench(fn: Callable[[], object]) -> float:
    fn()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    return do_bench(fn, warmup=100, rep=400, return_mode="median")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def sdpa(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


@contextlib.contextmanager
def triton_lang_kernel():
    """attention() on the Triton-lang kernel even where the Gluon one (attention_hopper.py) would run."""
    saved, A.HOPPER_KERNEL = A.HOPPER_KERNEL, False
    try:
        yield
    finally:
        A.HOPPER_KERNEL = saved


def on_triton_lang(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with triton_lang_kernel():
            return fn()

    return run


def attention_row(B: int, H: int, L: int, D: int) -> dict:
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    t8 = quantize_fp8(q, k, v)
    t8e4 = quantize_fp8(q, k, v, qk_format="fp8")
    fns = {
        "triton_bf16": lambda: attention(q, k, v),  # the Gluon kernel on sm_90
        "triton_lang_bf16": on_triton_lang(lambda: attention(q, k, v)),
        "triton_fp8_kernel": lambda: attention_fp8_quantized(t8),  # the Gluon kernel on sm_90
        "triton_lang_fp8_kernel": on_triton_lang(lambda: attention_fp8_quantized(t8)),
        "triton_fp8_e2e": lambda: attention_fp8(q, k, v),
        "triton_e4m3qk_kernel": lambda: attention_fp8_quantized(t8e4),
        "quantize_only": lambda: quantize_fp8(q, k, v),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION, qh, kh, vh),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION, qh, kh, vh),
    }
    tuners = {"triton_lang_bf16": A._attn_fwd_tuned, "triton_lang_fp8_kernel": A8._attn_fwd_fp8_tuned,
              "triton_e4m3qk_kernel": A8._attn_fwd_fp8_tuned}
    row: dict = {"shape": [B, H, L, D]}
    for name, fn in fns.items():
        try:
            ms = bench(fn)
        except Exception as e:  # one failing variant must not cost the rest of the run
            row[name] = {"error": repr(e)[:500], "ms": float("nan"), "tflops": float("nan")}
            print(f"{name} {B, H, L, D} failed: {e!r}"[:2000], flush=True)
            continue
        row[name] = {"ms": ms, "tflops": tflops(B, H, L, D, ms)}
        tuner = tuners.get(name)
        if tuner is not None and getattr(tuner, "configs_timings", None):
            row[name]["tuning_ms"] = {str(c): t[0] for c, t in tuner.configs_timings.items()}
            tuner.configs_timings = None
    ref = fns["sdpa_cudnn"]().transpose(1, 2)
    row["rel_err_bf16_vs_cudnn"] = rel_err(attention(q, k, v), ref)
    for fmt in ("int8", "fp8"):
        row[f"cos_fp8_{fmt}qk_vs_cudnn"] = F.cosine_similarity(
            attention_fp8(q, k, v, qk_format=fmt).float().flatten(), ref.float().flatten(), dim=0).item()
    print(json.dumps(row), flush=True)
    return row


def attention_rows(shapes: list[tuple[int, int, int, int]]) -> list[dict]:
    rows = []
    for shape in shapes:
        rows.append(attention_row(*shape))
        torch.cuda.empty_cache()
    return rows


HOST_SHAPES = [(1, 24, 1024, 128), (1, 24, 4608, 128)]


def host_us(fn: Callable[[], object], calls: int = 300) -> float:
    """Host time of one call (us): `calls` launches timed without synchronising. Valid where the host is the
    slower side, so that the launch queue never fills and blocks the loop."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def host_rows(shapes: list[tuple[int, int, int, int]]) -> list[dict]:
    """Host time of an attention call beside do_bench's time (which is the host's too once the host is slower),
    at a short length, where that can happen, and at FLUX's."""
    rows = []
    for B, H, L, D in shapes:
        q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        mask = torch.ones(B, L, dtype=torch.bool, device="cuda")
        mask[:, L - L // 8:] = False
        t8 = quantize_fp8(q, k, v)
        fns = {
            "attention": lambda: attention(q, k, v),
            "attention_mask": lambda: attention(q, k, v, mask=mask),
            "fp8_quantized": lambda: attention_fp8_quantized(t8),
            "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION, *(x.transpose(1, 2).contiguous() for x in (q, k, v))),
        }
        row: dict = {"shape": [B, H, L, D]}
        for name, fn in fns.items():
            row[name] = {"host_us": host_us(fn), "do_bench_us": bench(fn) * 1e3}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def diffusers_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers.models.embeddings.apply_rotary_emb(use_real=True, use_real_unbind_dim=-1, sequence_dim=1)."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos[None, :, None, :] + x_rotated.float() * sin[None, :, None, :]).to(x.dtype)


def prologue_rows(B: int, H: int, L: int, D: int) -> dict:
    """Norm + RoPE + attention + flatten, as FLUX's attention processor needs it."""
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    wq, wk = (torch.rand(D, device="cuda", dtype=torch.bfloat16) + 0.5 for _ in range(2))
    theta = torch.rand(L, D // 2, device="cuda", dtype=torch.float64) * 100
    cos, sin = (f(theta).repeat_interleave(2, dim=1).float() for f in (torch.cos, torch.sin))

    def separate_cudnn() -> torch.Tensor:
        qn = diffusers_rope(F.rms_norm(q, (D,), wq, 1e-6), cos, sin)
        kn = diffusers_rope(F.rms_norm(k, (D,), wk, 1e-6), cos, sin)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(qn.transpose(1, 2), kn.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2).flatten(2, 3)

    def separate_triton() -> torch.Tensor:
        qn = diffusers_rope(F.rms_norm(q, (D,), wq, 1e-6), cos, sin)
        kn = diffusers_rope(F.rms_norm(k, (D,), wk, 1e-6), cos, sin)
        return attention(qn, kn, v).flatten(2, 3)

    def fused(k_mode: str) -> Callable[[], torch.Tensor]:
        p = Prologue(q_weight=wq, k_weight=wk, eps=1e-6, cos=cos, sin=sin, k_mode=k_mode)
        return lambda: attention(q, k, v, prologue=p).flatten(2, 3)

    fns = {
        "separate_ops+sdpa_cudnn": separate_cudnn,
        "separate_ops+triton": separate_triton,
        "fused_prepass": fused("prepass"),
        "fused_inline": fused("inline"),
        "attention_only_triton": lambda: attention(q, k, v).flatten(2, 3),
        "attention_only_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION, q.transpose(1, 2), k.transpose(1, 2),
                                     v.transpose(1, 2)),
    }
    row: dict = {"shape": [B, H, L, D]}
    ref = separate_cudnn()
    for name, fn in fns.items():
        try:
            row[name] = {"ms": bench(fn)}
        except ValueError as exc:  # k_mode="inline" does not fit Hopper's shared memory at head_dim 128
            row[name] = {"error": str(exc), "ms": float("nan")}
            continue
        if name.startswith("fused") and getattr(A._attn_fwd_tuned, "configs_timings", None):
            row[name]["tuning_ms"] = {str(c): t[0] for c, t in A._attn_fwd_tuned.configs_timings.items()}
            A._attn_fwd_tuned.configs_timings = None
        if not name.startswith("attention_only"):
            row[name]["rel_err_vs_separate_cudnn"] = rel_err(fn(), ref)
    print(json.dumps(row), flush=True)
    return row


# One denoiser step of each model at its published size (random bf16 weights) and default resolution, or with
# --tiny at the built-in checkpoints' size (a CPU smoke test: --tiny --device cpu, fp32, Triton's interpreter).
STEP_MODELS = ("flux", "qwen-image", "wan-14b")


def step_model(name: str, device: torch.device, dtype: torch.dtype, tiny: bool
               ) -> tuple[str, torch.nn.Module, dict, Callable[[torch.nn.Module, str], int], float]:
    """(description, transformer, one step's inputs, its set_attention_backend, FLOP of the step)."""
    import bench_e2e  # perf/: the FLOP formulas of the end-to-end bench

    def build(cls, config) -> torch.nn.Module:
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with device:
                return cls(**config).eval()
        finally:
            torch.set_default_dtype(previous)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    if name == "flux":  # 1024x1024: 4096 image + 512 text tokens
        from diffusers import FluxTransformer2DModel

        from ditserve.checkpoints import FULL_ARCH, TINY_ARCH
        from ditserve.kernels.flux_processor import set_attention_backend

        config = {**(TINY_ARCH if tiny else FULL_ARCH).transformer, "guidance_embeds": True}
        model = build(FluxTransformer2DModel, config)
        side, txt = (5, 7) if tiny else (64, 512)
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0),
                                         indexing="ij"), -1).reshape(-1, 3)
        inputs = dict(hidden_states=randn(1, side * side, config["in_channels"]),
                      encoder_hidden_states=randn(1, txt, config["joint_attention_dim"]),
                      pooled_projections=randn(1, config["pooled_projection_dim"]),
                      timestep=torch.tensor([0.5], device=device, dtype=dtype),
                      guidance=torch.tensor([3.5], device=device, dtype=dtype),
                      img_ids=ids.to(device), txt_ids=torch.zeros(txt, 3, device=device))
        flop = bench_e2e.flux_step_flops(config, side * side, txt)["total_flop"]
        what = f"FLUX.1-dev{' (tiny)' if tiny else ''}, {side * side} + {txt} tokens"
        return what, model, inputs, set_attention_backend, flop
    if name == "qwen-image":  # 1024x1024: 4096 image + 256 text tokens, one prompt (no text padding)
        from diffusers import QwenImageTransformer2DModel

        from ditserve.kernels.qwen_processor import set_attention_backend
        from ditserve.qwen_image.checkpoint import FULL, TINY

        config = (TINY if tiny else FULL)["transformer"]
        model = build(QwenImageTransformer2DModel, config)
        side, txt = (5, 7) if tiny else (64, 256)
        inputs = dict(hidden_states=randn(1, side * side, config["in_channels"]),
                      encoder_hidden_states=randn(1, txt, config["joint_attention_dim"]),
                      timestep=torch.tensor([0.5], device=device, dtype=dtype), img_shapes=[[(1, side, side)]])
        flop = bench_e2e.dual_stream_step_flops(config, side * side, txt)["total_flop"]
        what = f"Qwen-Image{' (tiny)' if tiny else ' (20.4B)'}, {side * side} + {txt} tokens"
        return what, model, inputs, set_attention_backend, flop
    if name == "wan-14b":  # 480x832, 81 frames: 21 x 30 x 52 = 32760 video tokens, 512 text tokens; one row
        from diffusers import WanTransformer3DModel

        from ditserve.kernels.wan_processor import set_attention_backend
        from ditserve.wan.checkpoint import _TRANSFORMER, FULL_PRESETS  # the built-ins' transformer, and the 14B

        config = dict(_TRANSFORMER if tiny else FULL_PRESETS["wan2.1-t2v-14b"]["transformer"])
        model = build(WanTransformer3DModel, config)
        (frames, height, width), txt = ((3, 10, 10), 16) if tiny else ((21, 60, 104), 512)
        tokens = frames * (height // 2) * (width // 2)  # patch (1, 2, 2)
        inputs = dict(hidden_states=randn(1, config["in_channels"], frames, height, width),
                      encoder_hidden_states=randn(1, txt, config["text_dim"]),
                      timestep=torch.tensor([500.0], device=device))
        flop = bench_e2e.wan_forward_flops(config, tokens, txt)["total_flop"]
        what = f"Wan2.1-T2V-14B{' (tiny)' if tiny else ''}, {tokens} + {txt} tokens"
        return what, model, inputs, set_attention_backend, flop
    raise ValueError(f"unknown step model {name!r}; known: {STEP_MODELS}")


def step_rows(name: str, backends: list[str], runs: int, device: torch.device, tiny: bool) -> dict:
    """One transformer step of `name` per attention backend: "diffusers" (diffusers' processors, torch's SDPA
    dispatch), "cudnn" (the same restricted to cuDNN, as the denoisers' attention_backend=cudnn) and the
    registry backends through our processors (fused prologue on "triton"; "triton_lang": the same on the Triton-lang
    kernel where the Gluon one would run). Median of `runs` timed steps after
    one untimed step (Triton's autotuning), and the output's error against "diffusers"."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    what, model, inputs, set_attention_backend, flop = step_model(name, device, dtype, tiny)
    row: dict = {"model": what, "params_billion": sum(p.numel() for p in model.parameters()) / 1e9,
                 "step_tflop": flop / 1e12}

    def timed() -> float:
        if device.type != "cuda":
            start = time.perf_counter()
            model(**inputs, return_dict=False)
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(**inputs, return_dict=False)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    ref = None
    with torch.no_grad():
        for backend in ["diffusers", *backends]:
            set_attention_backend(model, {"cudnn": "diffusers", "triton_lang": "triton"}.get(backend, backend))
            context = (sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if backend == "cudnn"
                       else triton_lang_kernel() if backend == "triton_lang" else contextlib.nullcontext())
            try:
                with context:
                    out = model(**inputs, return_dict=False)[0]
                    times = [timed() for _ in range(runs)]
            except Exception as e:  # one failing backend must not cost the rest of the run
                row[backend] = {"error": repr(e)[:500]}
                print(f"{name} step {backend} failed: {e!r}"[:2000], flush=True)
                continue
            ref = out if ref is None else ref
            ms = statistics.median(times)
            row[backend] = {"ms": ms, "runs_ms": times, "tflops": flop / (ms * 1e-3) / 1e12,
                            "rel_err_vs_diffusers": rel_err(out, ref)}
            print(name, backend, json.dumps(row[backend]), flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def compile_check(arch: int = 90, quick: bool = False) -> list[dict]:
    """Cross-compile every Hopper config of every kernel for sm_{arch} (no GPU needed: Triton's bundled
    ptxas) and report registers / spills from `ptxas -v`. Catches GPU-only compile errors that the
    interpreter cannot see. Arguments are specialised as for the (1, 24, 4608, 128) benchmark shape.
    quick: one config per kernel family (the CPU test suite runs this)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    nvdisasm = ptxas.with_name("nvdisasm")
    D = 128
    scratch = tempfile.TemporaryDirectory()  # removed with the object when this function returns or raises
    tmp = scratch.name

    def exps_before_pv_wait(cubin: bytes) -> int:
        """In the SASS of a Gluon kernel's main loop (the innermost backward branch with MMAs and exponentials):
        how many MUFU.EX2 precede the first full wgmma wait (WARPGROUP.DEPBAR.LE gsb0, 0x0), i.e. run while P V
        is in flight. ptxas hoisted that wait above all of them in the first FP8 kernel (perf/RESULTS.md)."""
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        lines = subprocess.run([str(nvdisasm), "-c", str(path)], capture_output=True, text=True).stdout.splitlines()
        labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\.(L_x_\d+):", line))}
        loops = []
        for i, line in enumerate(lines):
            m = re.search(r"BRA `\(\.(L_x_\d+)\)", line)
            if m and labels.get(m.group(1), i) < i:
                body = lines[labels[m.group(1)]:i]
                if any("GMMA" in b for b in body) and sum("MUFU.EX2" in b for b in body) >= 32:
                    loops.append(body)
        body = min(loops, key=len)
        wait = next(i for i, b in enumerate(body) if "WARPGROUP.DEPBAR.LE gsb0, 0x0" in b)
        return sum("MUFU.EX2" in b for b in body[:wait])

    def run(fn, types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int, **options) -> dict:
        sig = {name: types.get(name, "i32") for name in fn.arg_names}
        sig.update({name: "constexpr" for name in constexprs})
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if name not in constexprs and sig[name] in ("i32",) or sig[name].startswith("*")}
        source = GluonASTSource if fn.is_gluon() else ASTSource
        try:
            k = triton.compile(source(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": num_warps, "num_stages": num_stages, **options})
        except Exception as e:
            return {"error": repr(e)[:300]}
        path = Path(tmp) / "kernel.ptx"
        path.write_text(k.asm["ptx"])
        out = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}a", str(path), "-o", os.devnull],
                             capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", out)
        spills = re.search(r"(\d+) bytes spill stores", out)
        row = {"regs": int(regs.group(1)) if regs else None, "spill_bytes": int(spills.group(1)) if spills else None,
               "shared": k.metadata.shared}
        if fn.is_gluon():
            row["exps_before_pv_wait"] = exps_before_pv_wait(k.asm["cubin"])
            # ptxas falls back to waiting after every wgmma when it cannot prove the asynchronous ones safe (C7514,
            # C7512): the pipelined FP8 loop's first version did, from a wait that left S_{j+1} in flight.
            if "wgmma.mma_async instructions are serialized" in out:
                row["error"] = "ptxas serialized the wgmma: " + out[out.index("due to"):].split("\n")[0][:160]
        return row

    def desc(dtype: str, rows: int) -> str:
        return f"tensordesc<{dtype}[{rows}, {D}]>"

    def pick(cfgs: frozenset) -> list:
        # quick: the PIPE+TMA config, which exercises the most code paths
        return [max(cfgs, key=lambda c: (c[5], c[4], -c[1]))] if quick else sorted(cfgs)

    rows = []
    for bm, bn, w, st, tma, pipe in pick(A.HOPPER_LONG):
        for prologue in (False, True):
            types = {n: "*bf16" for n in ("Q", "K", "V", "Out", "QW0", "QW1", "KW0", "KW1")}
            types.update(Lse="*fp32", Mask="*u8", Cos="*fp32", Sin="*fp32", sm_scale="fp32", eps="fp32",
                         Qd=desc("bf16", bm), Kd=desc("bf16", bn), Vd=desc("bf16", bn))
            cx = dict(HEAD_DIM=D, BLHD=True, HAS_MASK=False, NORM=prologue, ROPE=prologue, INTERLEAVED=True,
                      K_PROLOGUE=False, PRECISION="tf32", USE_TMA=tma, PIPE=pipe, BLOCK_M=bm, BLOCK_N=bn)
            r = run(A._attn_fwd_kernel, types, cx, w, st)
            rows.append({"kernel": "bf16" + ("+prologue" if prologue else ""), "cfg": [bm, bn, w, st, tma, pipe], **r})
            print(json.dumps(rows[-1]), flush=True)
    for d in (128,) if quick else AH.HEAD_DIMS:
        for masked in (True,) if quick else (False, True):
            descs = {name: f"tensordesc<bf16[{rows}, {d}],"
                           f"{gl.NVMMASharedLayout.get_default_for([rows, d], gl.bfloat16)!r}>"
                     for name, rows in (("q_desc", AH.BLOCK_M), ("k_desc", AH.BLOCK_N), ("v_desc", AH.BLOCK_N))}
            types = dict(descs, Out="*bf16", Lse="*fp32", Mask="*u8", Counter="*i32", qk_scale="fp32")
            cx = dict(BLHD=True, STAGES=AH.STAGES, TAIL=True, HAS_MASK=masked)
            r = run(AH._attn_fwd_hopper, types, cx, 4, 1, maxnreg=AH.MAXNREG)
            rows.append({"kernel": "bf16 hopper (gluon)", "cfg": [d, masked], **r})
            print(json.dumps(rows[-1]), flush=True)
    for int8 in (True, False):
        qk, qks = (gl.int8, "i8") if int8 else (gl.float8e4nv, "fp8e4nv")
        blocks = (("q_desc", [AH.BLOCK_M, D], qk, qks), ("k_desc", [AH.BLOCK_N, D], qk, qks),
                  ("vt_desc", [D, AH.BLOCK_N], gl.float8e4nv, "fp8e4nv"))
        types = {name: f"tensordesc<{ts}{block},{gl.NVMMASharedLayout.get_default_for(block, dt)!r}>"
                 for name, block, dt, ts in blocks}
        types.update(QS="*fp32", KS="*fp32", VS="*fp32", QM="*fp32", Out="*bf16", Lse="*fp32", Mask="*u8",
                     Counter="*i32", sm_scale="fp32")
        for masked in (False, True):  # ptxas schedules the two differently (the bf16 kernel hoists unmasked only)
            cx = dict(STAGES=AHF.STAGES, TAIL=True, HAS_MASK=masked, QK_INT8=int8)
            r = run(AHF._attn_fwd_hopper_fp8, types, cx, 4, 1, maxnreg=AH.MAXNREG)
            # All of a tile's 64 exponentials a thread before the wait: the +7-11% of 2026-11-27.
            if "error" not in r and r.get("exps_before_pv_wait", 64) < 64:
                r["error"] = (f"ptxas hoisted the P V wait above the softmax ({r['exps_before_pv_wait']} of 64 exp2 "
                              "before it)")
            rows.append({"kernel": f"{'int8qk' if int8 else 'e4m3qk'} hopper (gluon)", "cfg": [D, masked], **r})
            print(json.dumps(rows[-1]), flush=True)
    for bm, bn, w, st, tma, pipe in pick(A8.FP8_LONG):
        for int8 in (True, False):
            qk = "i8" if int8 else "fp8e4nv"
            types = dict(Q=f"*{qk}", K=f"*{qk}", Vt="*fp8e4nv", QS="*fp32", KS="*fp32", VS="*fp32", QM="*fp32",
                         Out="*bf16", Lse="*fp32", Mask="*u8", sm_scale="fp32", Qd=desc(qk, bm), Kd=desc(qk, bn),
                         Vtd=f"tensordesc<fp8e4nv[{D}, {bn}]>")
            cx = dict(HEAD_DIM=D, HAS_MASK=False, QK_INT8=int8, K_BLOCK=A8.K_BLOCK, USE_TMA=tma, PIPE=pipe,
                      BLOCK_M=bm, BLOCK_N=bn)
            r = run(A8._attn_fwd_fp8_kernel, types, cx, w, st)
            rows.append({"kernel": "int8qk" if int8 else "e4m3qk", "cfg": [bm, bn, w, st, tma, pipe], **r})
            print(json.dumps(rows[-1]), flush=True)
    for int8 in (True, False):
        qk = "i8" if int8 else "fp8e4nv"
        base = dict(X="*bf16", Mean="*fp32", Y=f"*{qk}", S="*fp32", QM="*fp32")
        qmax = 127.0 if int8 else 448.0
        for fn, cx, w in ((A8._quant_q_kernel, dict(HEAD_DIM=D, INT8=int8, QMAX=qmax, BLOCK_L=64), 4),
                          (A8._quant_k_kernel, dict(HEAD_DIM=D, INT8=int8, QMAX=qmax, K_BLOCK=A8.K_BLOCK), 8)):
            r = run(fn, base, cx, w, 2)
            rows.append({"kernel": f"{fn.__name__}[int8={int8}]", **r})
            print(json.dumps(rows[-1]), flush=True)
    for fn, types, cx, w in (
            (A8._quant_vt_kernel, dict(X="*bf16", S="*fp32", Yt="*fp8e4nv"), dict(HEAD_DIM=D, BLOCK_L=64), 4),
            (A8._kv_stats_kernel, dict(K="*bf16", V="*bf16", KSum="*fp32", VMax="*fp32"),
             dict(HEAD_DIM=D, K_BLOCK=A8.K_BLOCK, BLOCKS=A8.STATS_BLOCKS), 8),
            (A8._kv_finish_kernel, dict(KSum="*fp32", VMax="*fp32", Mean="*fp32", VS="*fp32"),
             dict(HEAD_DIM=D, VMAX=A8.FP8_MAX, BLOCK_B=16, BLOCK_D=32), 4)):
        r = run(fn, types, cx, w, 2)
        rows.append({"kernel": fn.__name__, **r})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def tuned_configs() -> dict[str, str]:
    out = {}
    for name, tuner in (("bf16", A._attn_fwd_tuned), ("fp8", A8._attn_fwd_fp8_tuned), ("prologue", A._prologue_tuned)):
        for key, cfg in tuner.cache.items():
            out[f"{name} {key}"] = str(cfg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="first two shapes only")
    ap.add_argument("--flux-step", action="store_true", help="= --step flux")
    ap.add_argument("--step", default="", help=f"comma-separated transformer steps to time: {','.join(STEP_MODELS)}")
    ap.add_argument("--step-backends", default="cudnn,sdpa,triton,triton_fp8",
                    help="attention backends of --step, besides diffusers' own processors")
    ap.add_argument("--step-runs", type=int, default=5, help="timed steps per backend (median)")
    ap.add_argument("--tiny", action="store_true", help="--step at the built-in checkpoints' size (smoke test)")
    ap.add_argument("--device", default="cuda", help="--step's device: cuda, or cpu with --tiny (fp32, needs "
                    "TRITON_INTERPRET=1 for the triton backend)")
    ap.add_argument("--compile-check", action="store_true", help="cross-compile all Hopper configs (no GPU)")
    ap.add_argument("--host", action="store_true", help="host time of one attention call (HOST_SHAPES)")
    args = ap.parse_args()
    if args.compile_check:
        rows = compile_check(quick=args.quick)
        bad = [r for r in rows if "error" in r]
        print(f"{len(rows)} kernels compiled for sm_90, {len(bad)} failed")
        raise SystemExit(1 if bad else 0)
    if args.host:
        with torch.inference_mode():  # as the denoisers call attention
            rows = host_rows(HOST_SHAPES)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_host.json").write_text(json.dumps(rows, indent=1))
        print(f"\n{torch.cuda.get_device_name()}: host us a call / do_bench us")
        for row in rows:
            print(row["shape"], ", ".join(f"{k} {v['host_us']:.1f} / {v['do_bench_us']:.1f}"
                                          for k, v in row.items() if k != "shape"))
        return
    steps = [s for s in args.step.split(",") if s] or (["flux"] if args.flux_step else [])
    if steps:
        device = torch.device(args.device)
        backends = [b for b in args.step_backends.split(",") if b]
        result = {"meta": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                           "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                           "triton": triton.__version__, "tiny": args.tiny}}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for name in steps:
            result[name] = step_rows(name, backends, args.step_runs, device, args.tiny)
            (Path(args.out) / "bench_step.json").write_text(json.dumps(result, indent=1))
        print(f"\none transformer step, {result['meta']['device']}, ms (TFLOP/s; rel. error vs diffusers):")
        for name in steps:
            row = result[name]
            cells = [f"{k} {v['ms']:.1f} ({v['tflops']:.0f}; {v['rel_err_vs_diffusers']:.1e})" if "ms" in v
                     else f"{k} failed" for k, v in row.items() if isinstance(v, dict)]
            print(f"{row['model']}: " + ", ".join(cells))
        return
    shapes = SHAPES[:2] if args.quick else SHAPES
    meta = {
        "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "triton": triton.__version__,
    }
    # Under inference_mode, as the denoisers call attention: in grad mode the custom ops' dispatch alone costs
    # ~0.4 ms a call on the host (perf/RESULTS.md, "Host time of one attention call").
    with torch.inference_mode():
        rows = attention_rows(shapes)
        pro = prologue_rows(1, 24, 4608, 128)
    result = {"meta": meta, "attention": rows, "prologue": pro, "configs": tuned_configs()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_attention.json").write_text(json.dumps(result, indent=1))

    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}")
    print("TFLOP/s (4*B*H*L^2*D / median time)")
    cols = ["triton_bf16", "triton_lang_bf16", "triton_fp8_kernel", "triton_lang_fp8_kernel", "triton_fp8_e2e",
            "triton_e4m3qk_kernel", "sdpa_cudnn", "sdpa_flash"]
    heads = ["bf16", "bf16 tl", "int8qk-fp8pv", "int8qk tl", "...e2e", "e4m3-all", "cuDNN", "flash"]
    print(f"{'shape':<20}" + "".join(f"{c:>14}" for c in heads) + f"{'bf16/cuDNN':>11}{'fp8/cuDNN':>10}{'cos fp8':>9}")
    for r in rows:
        t = {c: r[c]["tflops"] for c in cols}
        print(f"{str(tuple(r['shape'])):<20}" + "".join(f"{t[c]:>14.1f}" for c in cols)
              + f"{t['triton_bf16'] / t['sdpa_cudnn']:>11.2f}{t['triton_fp8_kernel'] / t['sdpa_cudnn']:>10.2f}"
              + f"{r['cos_fp8_int8qk_vs_cudnn']:>9.5f}")
    print("quantize_only ms: " + ", ".join(f"{r['quantize_only']['ms']:.3f}" for r in rows))
    print("prologue (1,24,4608,128), ms: " + ", ".join(f"{k} {v['ms']:.3f}" for k, v in pro.items() if k != "shape"))


if __name__ == "__main__":
    main()
