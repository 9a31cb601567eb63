"""Generation with the E2E protocol of the LoRA and SplitLoRA papers: beam 10, length penalty 0.8,
no-repeat n-gram 4, at most 64 new tokens; batched with left padding, on the merged model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hsplitlora.data.e2e import prompt_text


@dataclass
class GenerationSettings:
    num_beams: int = 10
    length_penalty: float = 0.8
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64
    batch_size: int = 8


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    mrs: Sequence[str],
    settings: GenerationSettings | None = None,
    on_batch: Callable[[int], None] | None = None,
    prompts: Sequence[str] | None = None,
) -> list[str]:
    """One output line per E2E MR, or per prompt of `prompts` as given (decoded up to
    end-of-text, newlines folded into spaces)."""
    prompts = list(prompts) if prompts is not None else [prompt_text(mr) for mr in mrs]
    settings = settings or GenerationSettings()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # prompts end where generation starts
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), settings.batch_size):
            chunk = prompts[start : start + settings.batch_size]
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            generated = model.generate(
                **encoded,
                do_sample=False,
                num_beams=settings.num_beams,
                length_penalty=settings.length_penalty,
                no_repeat_ngram_size=settings.no_repeat_ngram_size,
                max_new_tokens=settings.max_new_tokens,
                early_stopping=True,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            for row in new_tokens:
                text = tokenizer.decode(row, skip_special_tokens=True)
                outputs.append(" ".join(text.split()))
            if on_batch is not None:
                on_batch(len(chunk))
    finally:
        tokenizer.padding_side = side
    return outputs
