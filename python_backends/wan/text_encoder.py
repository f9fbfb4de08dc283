"""Wan prompt encoding: UMT5's last hidden states, as ``WanPipeline._get_t5_prompt_embeds``.

Each prompt is cleaned with WanPipeline's own ``prompt_clean`` (HTML unescaping, ftfy when
installed, whitespace), tokenized padded to ``max_sequence_length`` and encoded with the attention
mask; the hidden states of the padding are then zeroed. The transformer sees all
``max_sequence_length`` tokens, zeros included, without a mask, so every row has that one shape
and rows batch without padding of their own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from ditserve.flux.limits import MAX_PROMPT_CHARS
from ditserve.loading import Checkpoint
from ditserve.stage import Outputs, RequestError, Row, Runtime, Stage, check_parameter, prompt_fields, run_together
from ditserve.wan.checkpoint import MAX_SEQUENCE_LENGTH


@dataclasses.dataclass(frozen=True)
class TextEncoderOptions:
    max_sequence_length: int = MAX_SEQUENCE_LENGTH  # WanPipeline's default

    def __post_init__(self):
        check_parameter("max_sequence_length", self.max_sequence_length, 1, 1024)


class WanTextEncoder(Stage):
    """PROMPT and optional NEGATIVE_PROMPT -> (max_sequence_length, D) fp32 hidden states each.

    A request without NEGATIVE_PROMPT gets the empty prompt's, WanPipeline's negative for
    classifier-free guidance; the denoiser uses it only when GUIDANCE_SCALE > 1.
    """

    Options = TextEncoderOptions
    inputs = ("PROMPT", "NEGATIVE_PROMPT")
    outputs = ("PROMPT_EMBEDS", "NEGATIVE_PROMPT_EMBEDS")

    def __init__(self, runtime: Runtime, options: TextEncoderOptions | None = None):
        super().__init__(runtime, options)
        checkpoint = Checkpoint(runtime.model_path)
        self.tokenizer = checkpoint.load("tokenizer")
        self.text_encoder = checkpoint.load("text_encoder", runtime)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), max_sequence_length, D) fp32, zero after each text's own tokens."""
        batch = self.tokenizer(
            [prompt_clean(t) for t in texts],
            padding="max_length",
            max_length=self.options.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        ).to(self.runtime.device)
        hidden = self.text_encoder(batch.input_ids, batch.attention_mask).last_hidden_state
        # Stage boundaries carry fp32 (exact for bf16), whatever the compute dtype.
        return (hidden * batch.attention_mask.unsqueeze(-1).to(hidden.dtype)).float()

    def execute(self, rows: Sequence[Row]) -> list[Outputs | RequestError]:
        return run_together(rows, lambda row: prompt_fields(row, MAX_PROMPT_CHARS), self.encode_rows)

    def encode_rows(self, prompts: list[tuple[str, str | None]]) -> list[Outputs]:
        texts = [text for prompt, negative in prompts for text in (prompt, negative or "")]  # WanPipeline: negative or ""
        return [{"PROMPT_EMBEDS": p, "NEGATIVE_PROMPT_EMBEDS": n} for p, n in self.encode(texts).split(2)]
