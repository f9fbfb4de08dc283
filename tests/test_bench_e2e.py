"""perf/bench_e2e.py: its pipeline table against the model repository and ditserve's presets, its FLOP
formulas against the numbers in perf/RESULTS.md, the step-difference estimate, and its request path
against the shared tritonserver (every pipeline's tiny built-in is served there)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "perf"))
import bench_e2e  # noqa: E402

from ditserve import checkpoints  # noqa: E402


def ensemble(name: str) -> tuple[list[str], set[str], set[str]]:
    """(step models in order, input names, output names) of an ensemble's config.pbtxt."""
    text = (REPO / "model_repository" / name / "config.pbtxt").read_text()
    head, steps = text.split("ensemble_scheduling")
    inputs_block = head[head.index("input ["):head.index("output [")]
    outputs_block = head[head.index("output ["):]
    names = lambda block: set(re.findall(r'name:\s*"(\w+)"', block))  # noqa: E731
    return re.findall(r'model_name:\s*"(\w+)"', steps), names(inputs_block), names(outputs_block)


@pytest.mark.parametrize("name", list(bench_e2e.PIPELINES))
def test_pipeline_rows_match_the_repository_and_presets(name):
    import diffusers

    p = bench_e2e.PIPELINES[name]
    steps, inputs, outputs = ensemble(p.ensemble)
    assert list(p.stages) == steps  # ROLES order: request, text encoder, denoiser, VAE, postprocess
    sent = {bench_e2e.FIELDS[k][1] for k in p.settings if bench_e2e.FIELDS[k][1]} | set(p.request_constants)
    assert sent <= inputs and set(p.outputs) <= outputs
    assert hasattr(diffusers, p.reference)
    for preset in (p.preset, p.tiny_preset):
        assert preset in {*checkpoints.PRESETS, *checkpoints.OTHER_BUILTINS, *checkpoints.OTHER_PRESETS}


def test_flop_formulas_give_the_documented_numbers():
    flux = bench_e2e.flux_step_flops(dict(num_layers=19, num_single_layers=38), 4096, 512)
    assert round(flux["total_flop"] / 1e12, 2) == 74.38  # perf/RESULTS.md, FLUX.1-dev at 1024x1024
    qwen_config = dict(num_layers=60, num_attention_heads=24, attention_head_dim=128)
    qwen = bench_e2e.dual_stream_step_flops(qwen_config, 4096, 256)
    assert (round(qwen["linear_flop"] / 1e12, 1), round(qwen["attention_flop"] / 1e12, 1)) == (59.1, 14.0)
    from ditserve.wan.checkpoint import FULL_PRESETS

    wan = bench_e2e.wan_forward_flops(FULL_PRESETS["wan2.1-t2v-14b"]["transformer"], 21 * 30 * 52, 512)
    assert round(wan["linear_flop"] / 1e12) == 785 and round(wan["total_flop"] / 1e15, 2) == 1.68  # RESULTS.md


def test_defaults_are_the_issues_settings():
    qwen = bench_e2e.parse_args(["--pipeline", "qwen-image"])
    assert (qwen.preset, qwen.height, qwen.width, qwen.steps, qwen.true_cfg) == ("qwen-image", 1024, 1024, 50, 4.0)
    assert qwen.negative_prompt and qwen.device == "cuda" and qwen.dtype == "bfloat16"
    wan = bench_e2e.parse_args(["--pipeline", "wan-t2v", "--measure-steps", "2,4"])
    settings = (wan.height, wan.width, wan.frames, wan.guidance, wan.steps, wan.step_counts)
    assert settings == (480, 832, 81, 5.0, 50, [2, 4])
    assert wan.model_dir == "/tmp/ditserve_ckpt/wan2.1-t2v-14b-bfloat16" and wan.warmup_steps == 2
    flux = bench_e2e.parse_args(["--preset", "tiny", "--size", "64", "--steps", "2", "--device", "cpu"])  # bench_flux's
    assert (flux.pipeline, flux.height, flux.width, flux.dtype, flux.warmup_steps) == ("flux", 64, 64, "float32", 2)
    tiny = bench_e2e.parse_args(["--pipeline", "wan-t2v", "--tiny"])
    assert (tiny.preset, tiny.device, tiny.frames) == ("tiny-wan-t2v", "cpu", 5)
    with pytest.raises(SystemExit):
        bench_e2e.parse_args(["--pipeline", "wan-t2v", "--measure-steps", "4,2"])


def _side(e2e: dict[int, float], denoise: dict[int, float]) -> dict:
    return {"runs": {str(n): {"latency_ms": {"median": e2e[n]},
                              "stage_ms": {"transformer": {"median": denoise[n]}, "text_encoder": {"median": 50.0}},
                              "stats": {"wan_denoiser": {"success_ms": denoise[n]}}}
                     for n in e2e}}


def _report_rows(our_gpus: int = 1, flops: dict | None = None) -> dict[str, list[str]]:
    args = bench_e2e.parse_args(["--pipeline", "wan-t2v", "--measure-steps", "2,4"])
    res = {"config": {"pipeline": "wan-t2v", "preset": args.preset, "device": "cuda", "dtype": "bfloat16",
                      "settings": args.settings, "steps": 50, "step_counts": [2, 4], "warmup_steps": 2, "runs": 1,
                      "warmup": 1, "our_gpus": our_gpus},
           "diffusers": _side({2: 10_000.0, 4: 16_000.0}, {2: 5_900.0, 4: 11_900.0}),
           "ours": _side({2: 8_000.0, 4: 12_000.0}, {2: 3_950.0, 4: 7_950.0}),
           "flops": flops or {}}
    _, table = bench_e2e.build_report(res)
    return {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in table.splitlines()[2:])}


def test_step_difference_estimate():
    rows = _report_rows()
    assert rows["per step, from end-to-end latencies (ms)"] == ["3,000.0", "2,000.0"]
    assert rows["per step, from the denoising stage (ms)"] == ["3,000.0", "2,000.0"]
    assert rows["fixed costs: end-to-end at 2 steps - 2 x step (ms)"] == ["4,000.0", "4,000.0"]
    assert rows["ESTIMATE: end-to-end at 50 steps = fixed + 50 x step (ms)"] == ["154,000.0", "104,000.0"]
    assert rows["ESTIMATE: speed-up vs diffusers (x)"] == ["1.00", "1.48"]


def test_achieved_tflops_are_per_gpu():
    assert bench_e2e.denoiser_gpus([]) == 1
    assert bench_e2e.denoiser_gpus(["flux_denoiser.sp_degree=2", "flux_denoiser.ulysses_degree=2"]) == 2
    assert bench_e2e.denoiser_gpus(["wan_denoiser.cfg_parallel=true", "wan_denoiser.sp_degree=2"]) == 4
    # 2 PFLOP a step: diffusers 3 s on one GPU, ours 2 s on 2 GPUs.
    flops = {"total_flop": 2e15, "linear_flop": 1.5e15, "attention_flop": 0.5e15, "forwards": 1, "text_tokens": 512,
             "image_tokens": 32760, "hidden": 5120}
    rows = _report_rows(our_gpus=2, flops=flops)
    assert rows["achieved TFLOP/s per GPU (step FLOP / step time / GPUs)"] == ["666.7", "500.0"]


@pytest.mark.server
@pytest.mark.parametrize("name,extra", [("flux", []), ("qwen-image", []), ("wan-t2v", ["--measure-steps", "2,3"])])
def test_requests_and_statistics_through_the_server(triton_server, tmp_path, name, extra):
    """The bench's requests are valid for each ensemble, and each model's statistics count exactly the
    timed requests of each step count (not the warm-up, whose last stages Triton records late)."""
    args = bench_e2e.parse_args(["--pipeline", name, "--tiny", "--runs", "1", "--protocol", "http", *extra])
    p = bench_e2e.PIPELINES[name]
    result = bench_e2e.measure_ours(args, triton_server.http_url, triton_server.grpc_url, tmp_path)
    assert list(result["runs"]) == [str(n) for n in args.step_counts]
    for run in result["runs"].values():
        assert run["latency_ms"]["n"] == 1
        for model in (p.ensemble, *p.stages):
            assert run["stats"][model]["requests"] == 1, (model, run["stats"][model])
    frames = (args.frames,) if p.video else ()
    assert np.load(tmp_path / "ours_image.npy").shape == (*frames, args.height, args.width, 3)
    assert result["encoded_bytes"] > 0


def test_layout_names_give_the_denoiser_options_and_gpu_count():
    from bench_scaling_flux import layout_sets
    from layouts import parse_layout

    usp = parse_layout("USP 2x2, CUDA graphs")
    assert usp.gpus == 4 and usp.options == {"sp_degree": 4, "ulysses_degree": 2, "ring_degree": 2, "cuda_graphs": "true"}
    assert parse_layout("CFG parallel 2").gpus == 2 and parse_layout("1 GPU, true CFG").true_cfg
    assert parse_layout("Ulysses 2, 2 chunks").options == {"sp_degree": 2, "ulysses_degree": 2, "ulysses_chunks": 2}
    both = parse_layout("CFG parallel 2 x USP 2x2, 1 chunk")
    assert (both.gpus, both.ulysses_degree, both.ring_degree, both.ulysses_chunks, both.true_cfg) == (8, 2, 2, 1, True)
    assert parse_layout("CFG 2").options == parse_layout("CFG parallel 2 x 1 GPU").options == {"cfg_parallel": True}
    assert layout_sets("Ring 4") == (4, ["flux_denoiser.sp_degree=4", "flux_denoiser.ring_degree=4"])
    for bad in ("Ulysses", "USP 4", "Ulysses 2, graphs", "CFG 2 x CFG 2", "CFG 3"):
        with pytest.raises(ValueError, match="layout"):
            parse_layout(bad)


def test_wan_bench_takes_the_parallel_part_of_the_layouts():
    """bench_parallel_wan builds its meshes itself: the denoiser modifiers would be silently ignored, so they are refused."""
    from bench_parallel_wan import parse_layout as wan_layout

    assert (wan_layout("Ulysses 2, 2 chunks").ulysses_chunks, wan_layout("Ulysses 2").ulysses_chunks) == (2, 0)
    assert wan_layout("CFG 2 x USP 2x2, 1 chunk").gpus == 8
    for bad in ("Ulysses 2, two chunks", "Ulysses 2, CUDA graphs", "sp 1, true CFG", "Ring 2, cuDNN"):
        with pytest.raises(ValueError, match="layout"):
            wan_layout(bad)


def test_parallel_bench_times_every_layout_at_every_load(tmp_path):
    """bench_parallel on CPU (tiny FLUX, gloo): two rounds of loads, medians, latents equal across loads, and
    Ulysses' latents against one GPU's although "1 GPU" runs second."""
    import json
    import statistics
    import subprocess

    run = subprocess.run([sys.executable, str(REPO / "perf" / "bench_parallel.py"), "--device", "cpu", "--preset", "tiny",
                          "--model-dir", str(tmp_path / "ckpt"), "--size", "64", "--text-tokens", "8", "--repeats", "1",
                          "--layouts", "Ulysses 2;1 GPU", "--loads", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    layouts = json.loads((tmp_path / "bench_parallel.json").read_text())["layouts"]
    for name, row in layouts.items():
        assert len(row["loads"]) == 2 and row["loads_identical"], name
        assert row["step_ms"] == statistics.median(load["step_ms"] for load in row["loads"]), name
    assert layouts["Ulysses 2"]["error_vs_1gpu"]["rel_l2"] < 1e-5
    assert "2 loads" in (tmp_path / "bench_parallel.md").read_text()
