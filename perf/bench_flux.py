#!/usr/bin/env python3
"""End-to-end FLUX.1 benchmark: diffusers' FluxPipeline vs ditserve's flux_t2i ensemble on Triton.

``perf/bench_e2e.py --pipeline flux`` with the same flags (its docstring describes the phases and the
report); kept so that the commands in perf/RESULTS.md run unchanged. On the GPU host (after
``source perf/gpu_env.sh``)::

    python perf/bench_flux.py                       # flux.1-dev, bf16, cuda, 1024x1024, 28 steps, 3 runs

On a CPU machine (end-to-end smoke test of the same code paths)::

    python perf/bench_flux.py --preset tiny --size 64 --steps 2 --device cpu --runs 2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_e2e.main(["--pipeline", "flux", *sys.argv[1:]]))
