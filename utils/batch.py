"""Processor batches: rows, images, padding."""

import torch


def image_patch_counts(prompt_inputs):
    """(images, patches): per prompt, how many images it has and how many rows of pixel_values they fill (0 and
    0 for a text-only prompt). image_grid_thw has one row per image, in prompt order; a prompt's images are the
    next rows whose image tokens (patches / merge², merge² = patches per image token of the whole batch) add up
    to the prompt's image tokens (mm_token_type_ids == 1)."""
    n_prompts = prompt_inputs["input_ids"].shape[0]
    if "image_grid_thw" not in prompt_inputs:
        return [0] * n_prompts, [0] * n_prompts
    patches = prompt_inputs["image_grid_thw"].prod(-1).tolist()  # per image
    if "mm_token_type_ids" not in prompt_inputs:  # no way to tell: one image per prompt
        if len(patches) != n_prompts:
            raise ValueError("prompt inputs without mm_token_type_ids must have exactly one image per prompt")
        return [1] * n_prompts, patches
    tokens = (prompt_inputs["mm_token_type_ids"] == 1).sum(1).tolist()  # [B] image tokens per prompt
    per_token = sum(patches) // max(sum(tokens), 1)
    images, counts, next_image = [], [], 0
    for n_tokens in tokens:
        first = next_image
        while n_tokens > 0:
            n_tokens -= patches[next_image] // per_token
            next_image += 1
        images.append(next_image - first)
        counts.append(sum(patches[first:next_image]))
    return images, counts


def slice_inputs(inputs, rows):
    """Rows `rows` (a python slice or list of indices) of a processor batch, with their images' pixel_values and
    image_grid_thw rows (a prompt may have 0, 1 or several images; a slice without images has neither key)."""
    indices = list(range(inputs["input_ids"].shape[0]))[rows] if isinstance(rows, slice) else list(rows)
    out = {k: v[indices] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    if "pixel_values" in inputs:
        images, patches = image_patch_counts(inputs)
        image_start, patch_start = [0], [0]
        for n_images, n_patches in zip(images, patches):
            image_start.append(image_start[-1] + n_images)
            patch_start.append(patch_start[-1] + n_patches)
        image_rows = [j for i in indices for j in range(image_start[i], image_start[i + 1])]
        patch_rows = [j for i in indices for j in range(patch_start[i], patch_start[i + 1])]
        if image_rows:
            out["pixel_values"] = inputs["pixel_values"][patch_rows]
            out["image_grid_thw"] = inputs["image_grid_thw"][image_rows]
    # Left padding is shared across the batch; drop columns that are padding in every kept row.
    keep = out["attention_mask"].any(0).nonzero()
    first = int(keep[0]) if len(keep) else 0
    for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if k in out:
            out[k] = out[k][:, first:]
    return out


def concat_inputs(batches):
    """Concatenate processor batches row-wise, re-padding the prompts on the left; batches without images
    (text-only prompts) add no pixel_values rows."""
    width = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if k not in batches[0]:
            continue
        pad_value = 0
        parts = [torch.nn.functional.pad(b[k], (width - b[k].shape[1], 0), value=pad_value) for b in batches]
        out[k] = torch.cat(parts)
    for k in ("pixel_values", "image_grid_thw"):
        parts = [b[k] for b in batches if k in b]
        if parts:
            out[k] = torch.cat(parts)
    return out
