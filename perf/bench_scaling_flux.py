#!/usr/bin/env python3
"""FLUX end to end through Triton at several sequence-parallel layouts, one server per layout.

Runs ``perf/bench_flux.py --skip-diffusers`` once per layout, each with its own ``--set
flux_denoiser.*`` parameters (the server starts, loads the checkpoint on every rank of the denoiser's
worker group, serves 1 warm-up + ``--runs`` requests, stops), then prints one table: end-to-end
median latency at the client, denoising time, per step, speed-up and scaling efficiency against sp 1,
and server start-up. The first layout builds the checkpoint if it is missing; the others reuse it.

    python perf/bench_scaling_flux.py --layouts "sp 1;Ulysses 2;Ulysses 4;Ring 4;USP 2x2" --runs 3
    python perf/bench_scaling_flux.py --layouts "sp 1, CUDA graphs;Ulysses 4, CUDA graphs" --runs 3

Writes each layout's bench_flux.json under ``--out``/<layout>/ and bench_scaling_flux.json/.md to ``--out``
(default $OUT, else out/bench).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from layouts import parse_layout

HERE = Path(__file__).resolve().parent


def layout_sets(name: str) -> tuple[int, list[str]]:
    """(GPUs, bench_flux --set arguments) of a layout name (perf/layouts.py)."""
    layout = parse_layout(name)
    if layout.true_cfg:
        raise ValueError(f"layout {name!r}: FLUX.1-dev runs without true CFG here")
    sets = [f"flux_denoiser.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in layout.options.items()]
    return layout.gpus, sets


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default="sp 1;Ulysses 2;Ring 2;Ulysses 4;Ring 4;USP 2x2")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=None)
    args, passthrough = p.parse_known_args()  # the rest goes to bench_flux.py (e.g. --preset tiny --device cpu)
    out = Path(args.out or os.environ.get("OUT") or "out/bench")
    names = [n.strip() for n in args.layouts.split(";") if n.strip()]
    try:
        plans = {n: layout_sets(n) for n in names}
    except ValueError as exc:
        p.error(str(exc))
    rows = {}
    for i, name in enumerate(names):
        gpus, sets = plans[name]
        layout_out = out / re.sub(r"\W+", "_", name.lower())
        cmd = [sys.executable, str(HERE / "bench_flux.py"), "--skip-diffusers", "--no-carry-over",
               "--runs", str(args.runs), "--out", str(layout_out), *passthrough]
        cmd += [a for s in sets for a in ("--set", s)]
        if i:
            cmd.append("--skip-build")
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        rc = subprocess.call(cmd)
        try:
            res = json.loads((layout_out / "bench_flux.json").read_text())
            steps = res["config"]["steps"]
            ours, run = res["ours"], res["ours"]["runs"][str(steps)]  # bench_e2e's layout: one entry per step count
            rows[name] = {"gpus": gpus, "rc": rc, "e2e_ms": run["latency_ms"]["median"],
                          "runs_ms": run["latency_ms"].get("all"), "startup_s": ours.get("startup_s"),
                          "denoise_ms": run["stats"]["flux_denoiser"]["success_ms"],
                          "step_ms": run["stats"]["flux_denoiser"]["success_ms"] / steps, "sets": sets}
        except (OSError, KeyError, TypeError, ValueError) as exc:
            rows[name] = {"gpus": gpus, "rc": rc, "error": f"{type(exc).__name__}: {exc}"}
        (out / "bench_scaling_flux.json").write_text(json.dumps(rows, indent=1))
        if "error" in rows[name]:  # the next layouts would most likely fail alike: save the machine's time
            print(f"== stopping after {name} failed", flush=True)
            break

    first = next((r for r in rows.values() if r.get("gpus") == 1 and "error" not in r), {})  # the baseline
    base, base_step = first.get("e2e_ms"), first.get("step_ms")
    lines = ["| layout | GPUs | end-to-end (ms) | speed-up | efficiency | denoising (ms) | per step (ms) | step speed-up | start-up (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | {r['gpus']} | failed (rc {r['rc']}): {r['error'][:80]} | | | | | | |")
            continue
        speed = base / r["e2e_ms"] if base else float("nan")
        step_speed = base_step / r["step_ms"] if base_step else float("nan")
        lines.append(f"| {name} | {r['gpus']} | {r['e2e_ms']:,.1f} | {speed:.2f}x | {100 * speed / r['gpus']:.0f}% | "
                     f"{r['denoise_ms']:,.1f} | {r['step_ms']:.1f} | {step_speed:.2f}x | {r['startup_s'] or 0:.1f} |")
    table = "\n".join(lines)
    (out / "bench_scaling_flux.md").write_text(table + "\n")
    print(table, flush=True)
    return 0 if all(r.get("rc") == 0 and "error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
