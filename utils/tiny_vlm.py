"""The embedded tiny VLM: a Qwen2.5-VL built from a config, a locally trained tokenizer, a supervised warm start.

Nothing is downloaded. `ensure_tiny_vlm(cache_dir)` returns a folder that `transformers` loads like any
Qwen2.5-VL checkpoint. The warm start is shipped in the repository (SHIPPED, `models/tiny-vlm/`, 4 MB), so every
machine starts from the same weights: CPUs with other vector units (AVX2, AVX-512) build different warm starts from
the same recipe, and a run's outcome would otherwise depend on the machine that built it. When RECIPE below differs
from the shipped model's `recipe.json` (someone is changing the recipe), the model is built on the spot instead
(about a minute on a 2-core CPU) into `cache_dir/tiny-vlm-<recipe hash>/` and reused while the recipe is unchanged.

    python -m utils.tiny_vlm            # rebuild the shipped model from RECIPE, print its held-out accuracy
    python -m utils.tiny_vlm --check    # build into a temporary folder, compare with the shipped model
"""

import hashlib
import json
import os
import random
import shutil
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from data.prompts import SYSTEM_PROMPT, encode_prompts
from data.synthetic import QUESTION_KINDS, SyntheticVQA, reasoning_for
from utils.distributed import barrier, is_main_process
from utils.model import ImageOnlyProcessor

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
THINK_TOKENS = ["<think>", "</think>"]  # ordinary (decoded) tokens, so the format reward can see them
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The recipe. Changing anything here changes the hash, so the cached model is rebuilt.
RECIPE = {
    "vocab_size": 512,
    "text": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "mrope_section": [4, 6, 6]},  # mrope sums to head_dim/2 = 16
    "vision": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "patch_size": 7},
    "image_size": 56,
    # A tiny model initialised at the usual 0.02 keeps near-uniform attention for hundreds of steps and never
    # looks at the image in a short warm start; at 0.08 it reads colours within ~100 steps.
    "init_std": 0.08,
    "warm_start": {
        # Short on purpose: it masters the format and colour questions (100% held out) and stops while count
        # questions are half learned (~55%) and shape questions are not (~25%, chance): RL has work to do.
        # One thread: a multi-threaded run sums in another order, and 120 steps into a steep learning curve that
        # is enough to move held-out count accuracy by 20 points. One thread makes the build reproducible.
        "seed": 1234, "steps": 120, "batch_size": 32, "lr": 3e-3, "threads": 1,
        "kind_weights": {"colour": 1.0, "shape": 1.0, "count": 1.0},
    },
}


def recipe_hash():
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:10]


def train_tokenizer(vocab_size):
    """Byte-level BPE trained on the task's own text, with Qwen's special tokens and chat template."""
    data = SyntheticVQA(2000, seed=0, split="train")
    corpus = [SYSTEM_PROMPT, "system user assistant", "Answer: A Answer: B Answer: C Answer: D <answer>A</answer>"]
    for i in range(len(data)):
        ex = data[i]
        corpus.append(ex["problem"])
        corpus.append(f"<think>{reasoning_for(ex)}</think>Answer: {ex['solution']}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, padding_side="left", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.add_tokens(THINK_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer, patch_size, image_size):
    # White maps to 0: mean 1, std 1 over [0, 1] pixels. The tiny model reads images within seconds this
    # way; with CLIP normalisation it stalled at chance for minutes.
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=2, temporal_patch_size=2, image_mean=[1.0, 1.0, 1.0],
        image_std=[1.0, 1.0, 1.0], size={"shortest_edge": pixels // 4, "longest_edge": pixels * 4},
    )
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, text=None, vision=None, seed=None):
    """A randomly initialised Qwen2.5-VL sized by `text` / `vision` (default: RECIPE's), using the tokenizer's ids."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text, vision = text or RECIPE["text"], vision or RECIPE["vision"]
    vocab = (len(tokenizer) + 63) // 64 * 64
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab, "hidden_size": text["hidden_size"], "intermediate_size": text["intermediate_size"],
            "num_hidden_layers": text["num_hidden_layers"], "num_attention_heads": text["num_attention_heads"],
            "num_key_value_heads": text["num_key_value_heads"], "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": text["mrope_section"]},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"], "initializer_range": RECIPE["init_std"],
        },
        vision_config={
            "depth": vision["depth"], "hidden_size": vision["hidden_size"],
            "intermediate_size": vision["intermediate_size"], "num_heads": vision["num_heads"],
            "patch_size": vision["patch_size"], "out_hidden_size": text["hidden_size"], "window_size": 112,
            "fullatt_block_indexes": [vision["depth"] - 1], "initializer_range": RECIPE["init_std"],
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, initializer_range=RECIPE["init_std"],
    )
    torch.manual_seed(RECIPE["warm_start"]["seed"] if seed is None else seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def supervised_batch(processor, examples):
    """Prompt + target completion, with labels only on the completion (-100 elsewhere)."""
    inputs = encode_prompts(processor, examples)
    tok = processor.tokenizer
    targets = [f"<think>{reasoning_for(ex)}</think>Answer: {ex['solution']}<|im_end|>" for ex in examples]
    target_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in targets]
    width = max(len(t) for t in target_ids)
    pad = tok.pad_token_id
    completion = torch.full((len(examples), width), pad, dtype=torch.long)
    completion_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ids in enumerate(target_ids):  # right-pad the completions
        completion[i, : len(ids)] = torch.tensor(ids)
        completion_mask[i, : len(ids)] = 1
    prompt_labels = torch.full_like(inputs["input_ids"], -100)
    labels = torch.cat([prompt_labels, completion.masked_fill(completion_mask == 0, -100)], 1)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], completion], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], completion_mask], 1)
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion)], 1)
    return inputs, labels


def warm_start(model, processor):
    """A short supervised fine-tune on the synthetic task (format, colour, shape; few count questions)."""
    cfg = RECIPE["warm_start"]
    rng = random.Random(cfg["seed"])
    per_kind = {k: SyntheticVQA(10**6, seed=cfg["seed"], split="train", kinds=(k,), image_size=RECIPE["image_size"])
                for k in QUESTION_KINDS}
    kinds, weights = zip(*cfg["kind_weights"].items())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    model.train()
    bar = tqdm(range(cfg["steps"]), desc="warm start (supervised)", dynamic_ncols=True)
    for step in bar:
        batch = [per_kind[rng.choices(kinds, weights)[0]][rng.randrange(10**6)] for _ in range(cfg["batch_size"])]
        inputs, labels = supervised_batch(processor, batch)
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    torch.set_num_threads(threads)
    model.eval()
    return model


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "tiny-vlm")
HELD_OUT = {"size": 240, "seed": 0, "kinds": ("count",)}  # the default run's step-0 evaluation set (SEED = 0)
BUILD_TOLERANCE = 0.10  # a fresh build's held-out accuracy is within this of the shipped model's (CPUs differ)


def shipped_recipe():
    """The RECIPE the shipped model was built from, or None when there is no shipped model."""
    path = os.path.join(SHIPPED, "recipe.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(SHIPPED, "model.safetensors")):
        return None
    with open(path) as f:
        return json.load(f)


def ensure_tiny_vlm(cache_dir, log=print):
    """Folder of the warm-started tiny VLM: the shipped one while RECIPE is the one it was built from, else one
    built on first use into `cache_dir` (a minute or two on CPU). Under torchrun rank 0 builds it while the other
    ranks wait."""
    if shipped_recipe() == json.loads(json.dumps(RECIPE)):  # (tuples compare as the lists json gives back)
        return SHIPPED
    path = os.path.join(cache_dir, f"tiny-vlm-{recipe_hash()}")
    if not is_main_process():
        barrier()  # ... until rank 0 has it
        return path
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        build_tiny_vlm(path, log)
    barrier()
    return path


def build_tiny_vlm(path, log=print):
    """Build the tiny VLM (tokenizer, processor, warm start) into `path`, atomically."""
    log(f"building the embedded tiny VLM in {path} (RECIPE differs from the shipped model's; first use only)")
    start = time.time()
    tokenizer = train_tokenizer(RECIPE["vocab_size"])
    processor = build_processor(tokenizer, RECIPE["vision"]["patch_size"], RECIPE["image_size"])
    model = warm_start(build_model(tokenizer), processor)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "recipe.json"), "w") as f:
        json.dump(RECIPE, f, indent=2)
    os.replace(tmp, path)  # atomic: a killed build never leaves a half-written model behind
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    log(f"tiny VLM built in {time.time() - start:.0f}s ({n_params:.2f}M parameters)")


def held_out_accuracy(path):
    """Greedy accuracy and format rate of the model in `path` on HELD_OUT (the default run's step-0 evaluation)."""
    from utils.evaluate import evaluate
    from utils.model import load_model, load_processor, suppressed_token_ids
    from utils.specs import EvalSpec

    processor = load_processor(path)
    model = load_model(path, "cpu", torch.float32)
    data = SyntheticVQA(HELD_OUT["size"], seed=HELD_OUT["seed"], split="test", kinds=HELD_OUT["kinds"])
    greedy = EvalSpec(samples=len(data), temperature=0.0, top_p=1.0, samples_per_prompt=1, blank_image=False)
    metrics = evaluate(model, processor, data, greedy, 24, 128,  # dapo.py's MAX_NEW_TOKENS, GENERATION_BATCH_SIZE
                       suppressed_token_ids(processor.tokenizer))
    return metrics["eval/accuracy"], metrics["eval/format"]


def main(argv=None):
    import argparse
    import platform
    import tempfile

    parser = argparse.ArgumentParser(description="Rebuild the shipped tiny VLM (models/tiny-vlm/) from RECIPE, or "
                                                 "--check that a build here reproduces it.")
    parser.add_argument("--check", action="store_true", help="build into a temporary folder and compare")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build_tiny_vlm(os.path.join(tmp, "tiny-vlm"))
            built = held_out_accuracy(os.path.join(tmp, "tiny-vlm"))
        shipped = held_out_accuracy(SHIPPED)
        print(f"held-out accuracy / format: built here {built[0]:.3f} / {built[1]:.3f}, shipped {shipped[0]:.3f} / "
              f"{shipped[1]:.3f} (tolerance {BUILD_TOLERANCE})")
        raise SystemExit(0 if abs(built[0] - shipped[0]) <= BUILD_TOLERANCE else 1)
    build_tiny_vlm(SHIPPED + ".new")
    shutil.rmtree(SHIPPED, ignore_errors=True)
    os.replace(SHIPPED + ".new", SHIPPED)
    accuracy, fmt = held_out_accuracy(SHIPPED)
    cpu = platform.processor() or platform.machine()
    print(f"{SHIPPED}: held-out accuracy {accuracy:.3f}, format {fmt:.3f} ({HELD_OUT['size']} count questions, "
          f"seed {HELD_OUT['seed']}); built on {cpu}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
