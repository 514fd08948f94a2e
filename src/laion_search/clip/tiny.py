"""Write randomly initialised CLIP models in Hugging Face format, for tests and benchmarks.

``make_clip_model(dir, "tiny")`` is a few hundred KB and encodes in milliseconds;
``"vit-b-32"`` has exactly OpenAI CLIP ViT-B/32's architecture (so its timings are the real
model's) with random weights. Both are saved with a real CLIP byte-level BPE tokenizer (a small
vocabulary) and load through the same code path as the published model
(:class:`laion_search.clip.encoders.HFClipEncoder`). Their vectors carry no meaning across models, but
they are deterministic: the same text always gives the same vector.
"""

from __future__ import annotations

from pathlib import Path

WORDS = ["a", "the", "dog", "cat", "and", "photo", "of", "lego", "set", "beach", "sunset", "car", "red", "blue",
         "with", "on", "in", "friends", "house", "image"]


def _vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import pre_tokenizers

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # left-to-right merges that build each word into one token
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            merge = (a, b)
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(a + b, len(vocab))
            pieces = [a + b] + pieces[2:]
    return vocab, merges


def make_clip_model(out: str | Path, size: str = "tiny", seed: int = 0, image_size: int | None = None) -> Path:
    """Save a random CLIP model + tokenizer to ``out``; returns the directory. ``image_size``
    (a multiple of 32) overrides the model's input size, e.g. a tiny model at the published
    models' 224 px, for preprocessing tests."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab()
    text = dict(vocab_size=max(len(vocab), 49408 if size != "tiny" else len(vocab)), bos_token_id=0, eos_token_id=1,
                pad_token_id=1, max_position_embeddings=77)
    if size == "tiny":
        text.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8)
        projection = 16
    elif size == "vit-b-32":
        text.update(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32)
        projection = 512
    else:
        raise ValueError("size must be 'tiny' or 'vit-b-32'")
    if image_size is not None:
        if image_size <= 0 or image_size % 32:
            raise ValueError("image_size must be a positive multiple of 32")
        vision.update(image_size=image_size, patch_size=32 if image_size > 32 else vision["patch_size"])
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
    model.save_pretrained(out)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]  # (a, b) pairs are accepted
    tokenizer.save_pretrained(out)
    # the published models' preprocessing (OpenAI CLIP's), at this model's image size
    CLIPImageProcessor(size={"shortest_edge": vision["image_size"]},
                       crop_size={"height": vision["image_size"], "width": vision["image_size"]},
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(out)
    return out
