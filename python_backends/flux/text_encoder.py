"""FLUX.1 prompt encoding: CLIP's pooled embedding and T5's sequence embedding."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ditserve.flux.limits import MAX_PROMPT_CHARS
from ditserve.loading import Checkpoint
from ditserve.stage import Outputs, RequestError, Row, Runtime, Stage, check_parameter, prompt_fields, run_together


@dataclasses.dataclass(frozen=True)
class TextEncoderOptions:
    max_sequence_length: int = 512  # T5 tokens, as FluxPipeline's default

    def __post_init__(self):
        check_parameter("max_sequence_length", self.max_sequence_length, 1, 512)


def text_slots(prompts: Sequence[tuple[str, str | None]]) -> tuple[list[str], list[tuple[int, int | None]]]:
    """The texts to encode for rows of (prompt, optional negative), each row's prompt and then its
    negative when it has one, and per row (index of its prompt, index of its negative or None)."""
    texts: list[str] = []
    slots: list[tuple[int, int | None]] = []
    for prompt, negative in prompts:
        texts.append(prompt)
        slots.append((len(texts) - 1, None if negative is None else len(texts)))
        if negative is not None:
            texts.append(negative)
    return texts, slots


class FluxTextEncoder(Stage):
    """PROMPT and optional NEGATIVE_PROMPT -> T5 sequence embeddings and CLIP pooled embeddings.

    A request without NEGATIVE_PROMPT gets empty (zero-length) negative outputs, which tell
    the denoiser that true CFG is off for it, as ``FluxPipeline`` decides from
    ``negative_prompt is not None``.
    """

    Options = TextEncoderOptions
    inputs = ("PROMPT", "NEGATIVE_PROMPT")
    outputs = ("PROMPT_EMBEDS", "POOLED_PROMPT_EMBEDS", "NEGATIVE_PROMPT_EMBEDS", "NEGATIVE_POOLED_PROMPT_EMBEDS")

    def __init__(self, runtime: Runtime, options: TextEncoderOptions | None = None):
        super().__init__(runtime, options)
        checkpoint = Checkpoint(runtime.model_path)
        self.clip_tokenizer = checkpoint.load("tokenizer")
        self.clip = checkpoint.load("text_encoder", runtime)
        self.t5_tokenizer = checkpoint.load("tokenizer_2")
        self.t5 = checkpoint.load("text_encoder_2", runtime)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 embeddings (n, max_sequence_length, d) and CLIP pooled embeddings (n, d_pool), fp32."""
        def ids(tokenizer, max_length: int) -> torch.Tensor:  # as FluxPipeline tokenizes
            batch = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
            return batch.input_ids.to(self.runtime.device)

        pooled = self.clip(ids(self.clip_tokenizer, self.clip_tokenizer.model_max_length), output_hidden_states=False)
        pooled = pooled.pooler_output
        sequence = self.t5(ids(self.t5_tokenizer, self.options.max_sequence_length), output_hidden_states=False)[0]
        # Stage boundaries carry fp32 whatever the compute dtype: bf16 -> fp32 is exact, and
        # one config.pbtxt then serves CPU (fp32) and GPU (bf16) alike.
        return sequence.float(), pooled.float()

    def execute(self, rows: Sequence[Row]) -> list[Outputs | RequestError]:
        return run_together(rows, lambda row: prompt_fields(row, MAX_PROMPT_CHARS), self.encode_rows)

    def encode_rows(self, prompts: list[tuple[str, str | None]]) -> list[Outputs]:
        texts, slots = text_slots(prompts)
        sequence, pooled = self.encode(texts)
        empty_sequence = sequence.new_zeros((0, sequence.shape[-1]))
        empty_pooled = pooled.new_zeros((0,))
        results: list[Outputs] = []
        for prompt_index, negative_index in slots:
            has_negative = negative_index is not None
            results.append({
                "PROMPT_EMBEDS": sequence[prompt_index],
                "POOLED_PROMPT_EMBEDS": pooled[prompt_index],
                "NEGATIVE_PROMPT_EMBEDS": sequence[negative_index] if has_negative else empty_sequence,
                "NEGATIVE_POOLED_PROMPT_EMBEDS": pooled[negative_index] if has_negative else empty_pooled,
            })
        return results
