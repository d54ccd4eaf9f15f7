"""Prompt formatting: the chat template with a system instruction asking for <think>…</think> then the answer.

An example is a dict with `problem`, `solution` and its images: `image` (one PIL image, or None for a text-only
prompt) or `images` (a list). `<image>` placeholders in the problem place its images; without placeholders the
images come first. The system prompt is the example's `system_prompt` when it has one, else chosen by the
solution: the letter form for multiple choice, the free-form one (\\boxed{} or Answer:) for anything else.
"""

import math

from PIL import Image, ImageStat

from data.answers import answer_kind

# The embedded tiny VLM was warm-started on this exact string: keep it for the synthetic task.
SYSTEM_PROMPT = "Think inside <think> </think>, then give the letter as Answer: X"
FREE_FORM_SYSTEM_PROMPT = "Think inside <think> </think>, then give the final answer as \\boxed{X} or Answer: X"
IMAGE_PLACEHOLDER = "<image>"


def system_prompt_for(solution, system_prompt="auto"):
    """`system_prompt`, or for "auto" the prompt that fits the solution: letter form for a multiple-choice
    letter, free form for anything else."""
    if system_prompt != "auto":
        return system_prompt
    return SYSTEM_PROMPT if answer_kind(str(solution)) == "letter" else FREE_FORM_SYSTEM_PROMPT


def images_of(example):
    """The example's images as a list (empty for a text-only prompt)."""
    if "images" in example:
        return list(example["images"])
    return [example["image"]] if example.get("image") is not None else []


def blank_image(image):
    """An image with nothing to see: the same size, every pixel the image's mean colour (so its overall brightness and
    the number of visual tokens stay those of the original). A blank image maps to itself."""
    image = image if image.mode in ("RGB", "L") else image.convert("RGB")
    mean = [round(m) for m in ImageStat.Stat(image).mean]
    return Image.new(image.mode, image.size, tuple(mean) if len(mean) > 1 else mean[0])


def with_blank_images(example):
    """The example with each of its images blanked (blank_image); a text-only example as it is."""
    if "images" in example:
        return {**example, "images": [blank_image(image) for image in example["images"]]}
    if example.get("image") is not None:
        return {**example, "image": blank_image(example["image"])}
    return example


def user_content(problem, n_images):
    """Chat content: images at the problem's `<image>` placeholders, or all first when it has none."""
    pieces = problem.split(IMAGE_PLACEHOLDER)
    if len(pieces) == 1:
        return [{"type": "image"}] * n_images + [{"type": "text", "text": problem}]
    if len(pieces) - 1 != n_images:
        raise ValueError(f"the problem has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders for {n_images} images")
    content = []
    for i, piece in enumerate(pieces):
        if i:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece})
    return content


def chat_messages(problem, n_images=1, system_prompt=SYSTEM_PROMPT):
    return [
        {"role": "system", "content": [{"type": "text", "text": system_prompt}]},
        {"role": "user", "content": user_content(problem, n_images)},
    ]


def prompt_texts(processor, examples):
    """The chat-templated prompt string of each example, ending with the assistant turn's opening."""
    texts = []
    for ex in examples:
        system = ex.get("system_prompt") or system_prompt_for(ex["solution"])
        messages = chat_messages(ex["problem"], len(images_of(ex)), system)
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return texts


def encode_prompts(processor, examples):
    """Left-padded model inputs for a list of examples (text-only and image prompts may be mixed).

    Returns a dict with input_ids / attention_mask / mm_token_type_ids [B, P], and, when any example has an
    image, pixel_values [sum of patches, D] and image_grid_thw [n_images, 3] (images in prompt order).
    """
    images = [image for ex in examples for image in images_of(ex)]
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


def image_limits(processor):
    """(min_pixels, max_pixels, factor, patches per token) of the processor's image processor: what it resizes
    every image to fit (Qwen's smart_resize)."""
    ip = processor.image_processor
    size = ip.size if isinstance(ip.size, dict) else vars(ip.size)
    min_pixels = getattr(ip, "min_pixels", None) or size.get("shortest_edge") or 56 * 56
    max_pixels = getattr(ip, "max_pixels", None) or size.get("longest_edge") or 28 * 28 * 1280
    return min_pixels, max_pixels, ip.patch_size * ip.merge_size, ip.merge_size**2


def image_token_count(width, height, limits):
    """Image tokens the processor makes of a width×height image (Qwen's smart_resize rules); ValueError for an
    image it rejects (aspect ratio above 200)."""
    min_pixels, max_pixels, factor, _ = limits
    if min(width, height) < 1:
        raise ValueError(f"image of size {width}x{height}")
    if max(width, height) / min(width, height) > 200:
        raise ValueError(f"image aspect ratio {max(width, height) / min(width, height):.0f}:1 is above the "
                         f"processor's limit of 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h // factor) * (w // factor)


class PromptLength:
    """Prompt length in tokens from the problem, the image sizes and the system prompt, without running the
    chat template per row: the template's own tokens are counted once per system prompt."""

    def __init__(self, processor):
        self.processor, self.limits, self.overhead = processor, image_limits(processor), {}

    def __call__(self, problem, image_sizes, system_prompt):
        if system_prompt not in self.overhead:
            text = self.processor.apply_chat_template(chat_messages("", 0, system_prompt), tokenize=False,
                                                      add_generation_prompt=True)
            self.overhead[system_prompt] = len(self.processor.tokenizer(text).input_ids)
        problem = problem.replace(IMAGE_PLACEHOLDER, " ")
        image_tokens = sum(image_token_count(w, h, self.limits) + 2 for w, h in image_sizes)  # + vision start/end
        return self.overhead[system_prompt] + len(self.processor.tokenizer(problem).input_ids) + image_tokens
