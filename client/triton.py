"""A small Python client for the image ensembles, over Triton HTTP or gRPC."""

from __future__ import annotations

import dataclasses
import io
import time

import numpy as np
from PIL import Image

# Ensemble input name -> (Triton dtype, numpy dtype), as in model_repository/flux_t2i.
_SCALARS = {
    "HEIGHT": ("INT32", np.int32),
    "WIDTH": ("INT32", np.int32),
    "NUM_INFERENCE_STEPS": ("INT32", np.int32),
    "GUIDANCE_SCALE": ("FP32", np.float32),
    "TRUE_CFG_SCALE": ("FP32", np.float32),
    "SEED": ("INT64", np.int64),
    "NUM_IMAGES": ("INT32", np.int32),
}


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    png: list[bytes]
    pixels: np.ndarray  # (n, H, W, 3) uint8
    latency_s: float
    # Server compute time per stage model during this request (from Triton's statistics;
    # exact only when no other request ran at the same time).
    stage_ms: dict[str, float]

    @property
    def images(self) -> list[Image.Image]:
        return [Image.open(io.BytesIO(data)) for data in self.png]


class Client:
    def __init__(self, url: str, protocol: str = "http", model: str = "flux_t2i", timeout_s: float = 600.0):
        if protocol == "http":
            import tritonclient.http as triton
        elif protocol == "grpc":
            import tritonclient.grpc as triton
        else:
            raise ValueError(f"protocol: must be http or grpc, got {protocol!r}")
        self.triton = triton
        self.protocol = protocol
        self.model = model
        self.timeout_s = timeout_s
        kwargs = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}
        self.server = triton.InferenceServerClient(url, **kwargs)

    def _stage_models(self) -> list[str]:
        config = self.server.get_model_config(self.model)
        config = config if self.protocol == "http" else config_to_dict(config.config)
        steps = config.get("ensemble_scheduling", {}).get("step", [])
        return [step["model_name"] for step in steps] or [self.model]

    def _compute_ns(self, models: list[str]) -> dict[str, int]:
        totals = {}
        for model in models:
            stats = self.server.get_inference_statistics(model)
            stats = stats if self.protocol == "http" else config_to_dict(stats)
            totals[model] = sum(
                int(m["inference_stats"].get("compute_infer", {}).get("ns", 0)) for m in stats["model_stats"]
            )
        return totals

    def inputs(self, prompt: str, negative_prompt: str | None = None, **scalars) -> list:
        def tensor(name, datatype, value):
            array = np.array([[value]], dtype=object if datatype == "BYTES" else _SCALARS[name][1])
            item = self.triton.InferInput(name, list(array.shape), datatype)
            item.set_data_from_numpy(array)
            return item

        items = [tensor("PROMPT", "BYTES", prompt.encode())]
        if negative_prompt is not None:
            items.append(tensor("NEGATIVE_PROMPT", "BYTES", negative_prompt.encode()))
        for name, value in scalars.items():
            if name not in _SCALARS:
                raise ValueError(f"unknown input {name}; known: {sorted(_SCALARS)}")
            if value is not None:
                items.append(tensor(name, _SCALARS[name][0], value))
        return items

    def generate(self, prompt: str, negative_prompt: str | None = None, **scalars) -> GenerateResult:
        """Run the ensemble once. Scalars use the ensemble's names: HEIGHT=..., SEED=..."""
        stages = self._stage_models()
        before = self._compute_ns(stages)
        outputs = [self.triton.InferRequestedOutput(name) for name in ("PNG", "IMAGE")]
        start = time.perf_counter()
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = self.server.infer(self.model, self.inputs(prompt, negative_prompt, **scalars), outputs=outputs, **kwargs)
        latency = time.perf_counter() - start
        after = self._compute_ns(stages)
        return GenerateResult(
            png=list(result.as_numpy("PNG")[0]),
            pixels=result.as_numpy("IMAGE")[0],
            latency_s=latency,
            stage_ms={m: (after[m] - before[m]) / 1e6 for m in stages},
        )


def config_to_dict(message) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)
