"""Qwen-Image prompt encoding: Qwen2.5-VL's last hidden states of the templated prompt.

As ``QwenImagePipeline._get_qwen_prompt_embeds``: the prompt goes into the chat template, the
template's first ``prompt_template_encode_start_idx`` (34) tokens are dropped from the hidden
states, and at most ``max_sequence_length`` tokens are kept. Qwen-Image-Edit (``QwenImageEditTextEncoder``)
differs only in the template, the image, and no truncation. Prompts of different lengths are
encoded together, right-padded; each row's outputs are padded to the longest prompt of the call
and ``PROMPT_EMBEDS_MASK`` (1 for real tokens) says how many are its own, so that the rows of one
request share a shape and the denoiser can batch rows of different lengths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from ditserve.flux.limits import MAX_PROMPT_CHARS
from ditserve.flux.text_encoder import text_slots
from ditserve.loading import Checkpoint
from ditserve.qwen_image.checkpoint import (
    EDIT_PROMPT_TEMPLATE,
    EDIT_PROMPT_TEMPLATE_DROP,
    IMAGE_PAD,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_DROP,
)
from ditserve.stage import (
    NoOptions,
    Outputs,
    RequestError,
    Row,
    Runtime,
    Stage,
    check_parameter,
    prompt_fields,
    run_together,
    tensor_field,
)

TOKENIZER_MAX_LENGTH = 1024  # QwenImagePipeline.tokenizer_max_length


@dataclasses.dataclass(frozen=True)
class TextEncoderOptions:
    max_sequence_length: int = 512  # QwenImagePipeline's default

    def __post_init__(self):
        check_parameter("max_sequence_length", self.max_sequence_length, 1, 1024)


class QwenImageTextEncoder(Stage):
    """PROMPT and optional NEGATIVE_PROMPT -> hidden states (L, D) fp32 and their masks (L,) int64.

    A request without NEGATIVE_PROMPT gets zero-length negative outputs: true CFG is off for it.
    """

    Options = TextEncoderOptions
    inputs = ("PROMPT", "NEGATIVE_PROMPT")
    outputs = ("PROMPT_EMBEDS", "PROMPT_EMBEDS_MASK", "NEGATIVE_PROMPT_EMBEDS", "NEGATIVE_PROMPT_EMBEDS_MASK")
    template_drop = PROMPT_TEMPLATE_DROP

    def __init__(self, runtime: Runtime, options: TextEncoderOptions | None = None):
        super().__init__(runtime, options)
        checkpoint = Checkpoint(runtime.model_path)
        self.load_preprocessing(checkpoint)
        self.text_encoder = checkpoint.load("text_encoder", runtime)

    def load_preprocessing(self, checkpoint: Checkpoint) -> None:
        self.tokenizer = checkpoint.load("tokenizer")

    def condition(self, row: Row) -> Any:
        """What the row adds to its texts besides the words (Edit: its image); None here."""
        return None

    def model_inputs(self, texts: list[str], conditions: list[Any]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(
                [PROMPT_TEMPLATE.format(t) for t in texts],
                max_length=TOKENIZER_MAX_LENGTH + PROMPT_TEMPLATE_DROP,
                padding=True,
                truncation=True,
                return_tensors="pt",
            )
        )

    def kept(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states (n, D) of one text that the pipeline keeps."""
        return hidden[self.template_drop :][: self.options.max_sequence_length]

    @torch.inference_mode()
    def encode(self, texts: list[str], conditions: list[Any]) -> list[torch.Tensor]:
        """Per text: its hidden states (n_i, D) without the template prefix, fp32."""
        inputs = {k: v.to(self.runtime.device) for k, v in self.model_inputs(texts, conditions).items()}
        hidden = self.text_encoder(**inputs, output_hidden_states=True).hidden_states[-1]
        mask = inputs["attention_mask"].bool()
        per_text = hidden[mask].split(mask.sum(dim=1).tolist())
        # Stage boundaries carry fp32 (exact for bf16), whatever the compute dtype.
        return [self.kept(h).float() for h in per_text]

    def execute(self, rows: Sequence[Row]) -> list[Outputs | RequestError]:
        return run_together(rows, lambda row: (prompt_fields(row, MAX_PROMPT_CHARS), self.condition(row)),
                            self.encode_rows)

    def encode_rows(self, parsed: list[tuple[tuple[str, str | None], Any]]) -> list[Outputs]:
        texts, slots = text_slots([prompts for prompts, _ in parsed])
        # Both prompts of a row see its condition.
        conditions = [condition for (_, negative), condition in parsed for _ in range(1 if negative is None else 2)]
        embeds = self.encode(texts, conditions)
        width = embeds[0].shape[-1]
        positive_len = max(embeds[p].shape[0] for p, _ in slots)
        negatives = [n for _, n in slots if n is not None]
        negative_len = max((embeds[n].shape[0] for n in negatives), default=0)

        def padded(index: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
            e = embeds[index]
            out = e.new_zeros((length, width))
            out[: e.shape[0]] = e
            mask = torch.zeros(length, dtype=torch.int64, device=e.device)
            mask[: e.shape[0]] = 1
            return out, mask

        empty = embeds[0].new_zeros((0, width)), torch.zeros(0, dtype=torch.int64, device=embeds[0].device)
        results: list[Outputs] = []
        for prompt_index, negative_index in slots:
            outputs: Outputs = {}
            outputs["PROMPT_EMBEDS"], outputs["PROMPT_EMBEDS_MASK"] = padded(prompt_index, positive_len)
            negative = empty if negative_index is None else padded(negative_index, negative_len)
            outputs["NEGATIVE_PROMPT_EMBEDS"], outputs["NEGATIVE_PROMPT_EMBEDS_MASK"] = negative
            results.append(outputs)
        return results


class QwenImageEditTextEncoder(QwenImageTextEncoder):
    """PROMPT, NEGATIVE_PROMPT and CONDITION_IMAGE -> the outputs of ``QwenImageTextEncoder``.

    As ``QwenImageEditPipeline._get_qwen_prompt_embeds``: the Edit template, whose image placeholder
    becomes one token per merged 2x2 patch of the image as Qwen2VLProcessor expands it (the image
    processor and tokenizer are the checkpoint's ``processor/``); the kept hidden states (after the
    64-token system prefix) start with the image's. Both prompts of a row see its image.
    """

    Options = NoOptions  # QwenImageEditPipeline does not truncate: its max_sequence_length is unused
    inputs = (*QwenImageTextEncoder.inputs, "CONDITION_IMAGE")
    template_drop = EDIT_PROMPT_TEMPLATE_DROP

    def load_preprocessing(self, checkpoint: Checkpoint) -> None:
        # Qwen2VLProcessor's parts: the processor itself cannot be built without torchvision in
        # transformers 5.24 (its class check of the video processor fails).
        from transformers import AutoImageProcessor, AutoTokenizer

        folder = checkpoint.folder("processor")
        with checkpoint.reading("processor", folder):
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.image_processor = AutoImageProcessor.from_pretrained(folder)

    def condition(self, row: Row) -> Image.Image:
        pixels = tensor_field(row, "CONDITION_IMAGE", 3, torch.device("cpu"), torch.uint8)
        if pixels.shape[-1] != 3:
            raise RequestError("CONDITION_IMAGE", f"expected (H, W, 3), got shape {tuple(pixels.shape)}")
        return Image.fromarray(pixels.numpy())

    def model_inputs(self, texts: list[str], conditions: list[Image.Image]) -> dict[str, torch.Tensor]:
        images = self.image_processor(images=conditions, return_tensors="pt")
        merged = self.image_processor.merge_size**2
        expanded = [
            EDIT_PROMPT_TEMPLATE.format(text).replace(IMAGE_PAD, IMAGE_PAD * (int(grid.prod()) // merged), 1)
            for text, grid in zip(texts, images["image_grid_thw"])
        ]
        tokens = self.tokenizer(expanded, padding=True, return_tensors="pt")
        return dict(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=images["pixel_values"],
            image_grid_thw=images["image_grid_thw"],
        )

    def kept(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[self.template_drop :]
