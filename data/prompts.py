"""Prompt formatting: the chat template with a system instruction asking for <think>…</think>Answer: X."""

SYSTEM_PROMPT = "Think inside <think> </think>, then give the letter as Answer: X"


def chat_messages(problem, has_image=True):
    user = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": problem}]
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": user},
    ]


def prompt_texts(processor, examples):
    """The chat-templated prompt string of each example, ending with the assistant turn's opening."""
    return [
        processor.apply_chat_template(
            chat_messages(ex["problem"], ex.get("image") is not None), tokenize=False, add_generation_prompt=True
        )
        for ex in examples
    ]


def encode_prompts(processor, examples):
    """Left-padded model inputs for a list of examples.

    Returns a dict with input_ids / attention_mask / mm_token_type_ids [B, P], and, when any example has an
    image, pixel_values [sum of patches, D] and image_grid_thw [n_images, 3].
    """
    images = [ex["image"] for ex in examples if ex.get("image") is not None]
    if images and len(images) != len(examples):
        raise ValueError("a batch must be all image prompts or all text-only prompts")
    return dict(
        processor(
            text=prompt_texts(processor, examples),
            images=images or None,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            return_mm_token_type_ids=True,
        )
    )
