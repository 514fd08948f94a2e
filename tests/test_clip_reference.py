"""Our CLIP encoders (tokenizer + preprocessing without torchvision) give what transformers'
reference pipeline gives: CLIPProcessor, then get_text_features / get_image_features."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from laion_search.clip.encoders import get_encoder  # noqa: E402
from laion_search.clip.tiny import make_clip_model  # noqa: E402

TEXTS = ["a photo of a dog", "LEGO set", "a red car on the beach at sunset, with friends and a blue house",
         "cat " * 100]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_clip_model(tmp_path_factory.mktemp("clip") / "tiny", "tiny", seed=3))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _features(out) -> np.ndarray:
    t = out if hasattr(out, "detach") else out.pooler_output
    return t.detach().float().numpy()


def test_encode_text_equals_the_reference(tiny):
    proc = transformers.CLIPProcessor.from_pretrained(tiny)
    model = transformers.CLIPModel.from_pretrained(tiny).eval()
    batch = proc(text=TEXTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.inference_mode():
        ref = _unit(_features(model.get_text_features(input_ids=batch["input_ids"],
                                                      attention_mask=batch["attention_mask"])))
    ours = get_encoder(tiny).encode_text(TEXTS)
    assert ours.shape == ref.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert np.abs(ours[0] - ours[1]).max() > 1e-3  # different texts, different vectors


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    out = []
    for w, h in [(32, 32), (48, 40), (100, 30), (31, 77), (257, 129)]:
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    grey = Image.fromarray(rng.integers(0, 256, (50, 60), dtype=np.uint8))  # mode L
    rgba = Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8))  # alpha
    return out + [grey.convert("RGB"), rgba.convert("RGB")]


def test_encode_image_equals_the_reference(tiny):
    proc = transformers.CLIPProcessor.from_pretrained(tiny)
    model = transformers.CLIPModel.from_pretrained(tiny).eval()
    images = _images()
    pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    enc = get_encoder(tiny)
    ours_pixels = np.stack([enc.preprocess(im) for im in images])
    np.testing.assert_allclose(ours_pixels, pixels.numpy(), atol=1e-5)  # the same PIL resize and crop
    with torch.inference_mode():
        ref = _unit(_features(model.get_image_features(pixel_values=pixels)))
    ours = enc.encode_image(images)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
