"""Our CLIP encoders against references independent of them: image preprocessing at the published
models' 224 px against OpenAI CLIP's rules written out with PIL + numpy; the text tower's forward
pass written out in numpy from the model's weights; and transformers' pipeline (CLIPProcessor, then
get_text_features / get_image_features)."""

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
    # the same PIL resize and crop, but where the crop's overhang is 3, 7, 11, ... pixels: there
    # transformers floors the offset and OpenAI CLIP (torchvision) rounds it, as we do (the 257×129
    # image is 63×32 after the resize: a 31-pixel overhang, offset 16, not 15): one pixel apart
    n, shifted = enc.image_size, 0
    for im, a, b in zip(images, ours_pixels, pixels.numpy()):
        w, h = im.size
        over = (0, int(n * h / w) - n) if w <= h else (int(n * w / h) - n, 0)
        dx, dy = (int(round(o / 2.0)) - o // 2 for o in over)
        np.testing.assert_allclose(a[:, :n - dy, :n - dx], b[:, dy:, dx:], atol=1e-5, err_msg=str(im.size))
        shifted += bool(dx or dy)
    assert shifted == 2  # 257×129 and 31×77
    with torch.inference_mode():
        ref = _unit(_features(model.get_image_features(pixel_values=torch.from_numpy(ours_pixels))))
    ours = enc.encode_image(images)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


# -- preprocessing at the real model's 224 px, against OpenAI CLIP's published rules --------------------
OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def openai_preprocess(img: Image.Image, n: int = 224) -> np.ndarray:
    """OpenAI CLIP's ``_transform(n)`` written out: Resize(n, bicubic) — the shortest side to n, the
    other side n × long / short truncated —, CenterCrop(n) with offsets round((side - n) / 2),
    to [0, 1], then (x - mean) / std per channel; CHW, float64."""
    w, h = img.size
    size = (n, int(n * h / w)) if w <= h else (int(n * w / h), n)
    img = img.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    w, h = img.size
    top, left = int(round((h - n) / 2.0)), int(round((w - n) / 2.0))
    a = np.asarray(img, np.float64)[top:top + n, left:left + n] / 255.0
    return ((a - OPENAI_MEAN) / OPENAI_STD).transpose(2, 0, 1)


def test_preprocess_at_224_follows_openai_clip(tmp_path):
    enc = get_encoder(str(make_clip_model(tmp_path / "tiny224", "tiny", seed=4, image_size=224)))
    assert enc.image_size == 224
    rng = np.random.default_rng(9)
    # square, landscape, portrait, tiny (upscaled), a 1-pixel overhang, overhangs of 3 (after the
    # resize: 227), 72 (even), 799 (round differs from floor), and a grey and an RGBA image
    sizes = [(224, 224), (640, 480), (480, 640), (97, 61), (225, 224), (227, 300), (300, 227), (1023, 224),
             (224, 1023)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    images += [Image.fromarray(rng.integers(0, 256, (300, 260), dtype=np.uint8)).convert("RGB"),
               Image.fromarray(rng.integers(0, 256, (230, 250, 4), dtype=np.uint8)).convert("RGB")]
    for im in images:
        ours = enc.preprocess(im)
        assert ours.shape == (3, 224, 224) and ours.dtype == np.float32, im.size
        np.testing.assert_allclose(ours, openai_preprocess(im), atol=1e-5, err_msg=str(im.size))
    # the published statistics, not a file's: a flat mid-grey image maps to (0.5 - mean) / std
    grey = enc.preprocess(Image.new("RGB", (500, 300), (128, 128, 128)))
    np.testing.assert_allclose(grey[:, 0, 0], (128 / 255 - OPENAI_MEAN) / OPENAI_STD, atol=1e-6)


# -- the text tower's forward pass in numpy, from the saved weights ---------------------------------------
def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def numpy_text_features(model_dir: str, words: list[str]) -> np.ndarray:
    """CLIP's text tower, written out from the safetensors weights and config.json (nothing of
    transformers' modelling code): tokens (<start>, one token per word of the tiny vocabulary —
    every word of it but "sunset", which BPE splits —,
    <end>), token + position embeddings, pre-LN layers (causal multi-head attention, quick-GELU MLP),
    the final LayerNorm, the hidden state at the end-of-text token, the projection, unit length."""
    import json
    from pathlib import Path

    from safetensors.numpy import load_file

    d = Path(model_dir)
    w = {k: v.astype(np.float64) for k, v in load_file(str(d / "model.safetensors")).items()}
    cfg = json.loads((d / "config.json").read_text())["text_config"]
    vocab = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
    ids = [cfg["bos_token_id"]] + [vocab[word + "</w>"] for word in words] + [cfg["eos_token_id"]]
    t = "text_model."
    x = w[t + "embeddings.token_embedding.weight"][ids] + w[t + "embeddings.position_embedding.weight"][:len(ids)]
    n, width = x.shape
    heads = cfg["num_attention_heads"]
    hd = width // heads
    eps = cfg["layer_norm_eps"]
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"{t}encoder.layers.{i}."

        def lin(name, v):
            return v @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        h = _layer_norm(x, w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"], eps)
        q, k, v = (lin(f"self_attn.{m}_proj", h).reshape(n, heads, hd).transpose(1, 0, 2) for m in "qkv")
        scores = q @ k.transpose(0, 2, 1) * hd ** -0.5 + causal
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        att = (scores / scores.sum(-1, keepdims=True)) @ v
        x = x + lin("self_attn.out_proj", att.transpose(1, 0, 2).reshape(n, width))
        h = _layer_norm(x, w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"], eps)
        h = lin("mlp.fc1", h)
        assert cfg.get("hidden_act", "quick_gelu") == "quick_gelu"
        h = h / (1 + np.exp(-1.702 * h))  # quick GELU: x·σ(1.702x)
        x = x + lin("mlp.fc2", h)
    x = _layer_norm(x, w[t + "final_layer_norm.weight"], w[t + "final_layer_norm.bias"], eps)
    pooled = x[ids.index(cfg["eos_token_id"])]
    out = pooled @ w["text_projection.weight"].T
    return out / np.linalg.norm(out)


def test_encode_text_equals_a_numpy_forward_pass(tiny):
    texts = ["a photo of a dog", "lego set", "a red car on the beach with friends and a blue house", "cat",
             " ".join(["cat", "dog"] * 30)]
    ours = get_encoder(tiny).encode_text(texts)  # one padded batch: padding must not change a text's vector
    for text, vec in zip(texts, ours):
        ref = numpy_text_features(tiny, text.split())
        np.testing.assert_allclose(vec, ref, atol=2e-5, err_msg=text)


# -- OpenClipEncoder ---------------------------------------------------------------------------------------
# open_clip_torch is not installed here: it imports torchvision, and torchvision from PyPI pins a CUDA
# build of torch. What can be tested without it is the encoder's own code: how it asks open_clip for
# the model (architecture, a checkpoint file in a temp dir, no hub), tokenises, batches, normalises,
# and fails. A stand-in ``open_clip`` module gives it a tiny model in open_clip's interface, with
# weights loaded from the checkpoint file; the expected vectors are computed in numpy from that file.
class _TinyOpenClip(torch.nn.Module):
    def __init__(self, vocab: int = 64, width: int = 8, dim: int = 6):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(vocab, width)
        self.text_projection = torch.nn.Parameter(torch.zeros(width, dim))
        self.visual = torch.nn.Linear(3, dim)

    def encode_text(self, tokens):  # mean of the token embeddings, projected
        return self.token_embedding(tokens).mean(1) @ self.text_projection

    def encode_image(self, pixels):  # per-channel means, through a linear layer
        return self.visual(pixels.mean((2, 3)))


def _fake_open_clip(calls: list):
    import types

    mod = types.ModuleType("open_clip")

    def create_model_and_transforms(arch, pretrained=None):
        calls.append((arch, pretrained))
        if arch != "tiny-arch":
            raise RuntimeError(f"Model config for {arch} not found.")
        model = _TinyOpenClip()
        model.load_state_dict(torch.load(pretrained))

        def preprocess(img):
            a = np.asarray(img.convert("RGB").resize((8, 8)), np.float32) / 255.0
            return torch.from_numpy(a.transpose(2, 0, 1).copy())

        return model, None, preprocess

    def get_tokenizer(arch):
        return lambda texts: torch.tensor([[(ord(c) % 63) + 1 for c in (t + " " * 12)[:12]] for t in texts])

    mod.create_model_and_transforms = create_model_and_transforms
    mod.get_tokenizer = get_tokenizer
    return mod


def test_open_clip_encoder_on_a_tiny_checkpoint(tmp_path, monkeypatch):
    import sys

    from laion_search.clip import encoders
    from laion_search.errors import EncoderError

    torch.manual_seed(1)
    ckpt = tmp_path / "tiny" / "open_clip_model.pt"
    ckpt.parent.mkdir()
    state = _TinyOpenClip().state_dict()
    state["text_projection"] = torch.randn(8, 6)
    torch.save(state, ckpt)
    calls: list = []
    monkeypatch.setitem(sys.modules, "open_clip", _fake_open_clip(calls))
    monkeypatch.setattr(encoders, "hub_reachable", lambda *a, **k: pytest.fail("a checkpoint file needs no hub"))
    spec = f"open_clip:tiny-arch/{ckpt}"
    monkeypatch.setattr(encoders, "_CACHE", {})
    enc = get_encoder(spec)
    assert isinstance(enc, encoders.OpenClipEncoder) and calls == [("tiny-arch", str(ckpt))]
    assert enc.name == spec and enc.dim == 6

    w = {k: v.numpy().astype(np.float64) for k, v in torch.load(ckpt).items()}
    texts = ["a dog", "LEGO set", "x" * 40, "a photo of a cat", "é漢"]
    ours = enc.encode_text(texts, batch_size=2)  # three batches
    tokens = np.array([[(ord(c) % 63) + 1 for c in (t + " " * 12)[:12]] for t in texts])
    ref = w["token_embedding.weight"][tokens].mean(1) @ w["text_projection"]
    np.testing.assert_allclose(ours, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)
    assert ours.dtype == np.float32 and enc.encode_text([]).shape == (0, 6)

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (h, 17, 3), dtype=np.uint8)) for h in (9, 30, 17)]
    ours = enc.encode_image(images, batch_size=2)
    px = np.stack([np.asarray(im.resize((8, 8)), np.float64).mean((0, 1)) / 255.0 for im in images])
    ref = px @ w["visual.weight"].T + w["visual.bias"]
    np.testing.assert_allclose(ours, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)

    # failures: an unknown architecture, and open_clip missing, each a one-line EncoderError
    with pytest.raises(EncoderError, match=r"cannot load open_clip model 'nope/.*': Model config for nope not found") as e:
        encoders.OpenClipEncoder(f"nope/{ckpt}")
    assert "local checkpoint file" in str(e.value.fix)
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(EncoderError, match="pip install open_clip_torch"):
        encoders.OpenClipEncoder(f"tiny-arch/{ckpt}")
