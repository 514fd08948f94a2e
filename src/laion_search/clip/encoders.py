"""CLIP encoders: text and images → L2-normalised float32 vectors, batched, model loaded once.

LAION-400M's embeddings come from OpenAI CLIP ViT-B/32, so that is the default
(``openai/clip-vit-base-patch32``, Hugging Face format). Choose another with ``--model`` or
``$LAION_CLIP_MODEL``:

* a Hugging Face model id or a local directory with a CLIP model (``config.json``, weights,
  tokenizer files) — e.g. a copy made on a machine with internet by
  ``hf download openai/clip-vit-base-patch32 --local-dir ./clip-b32``;
* ``open_clip:ARCH/PRETRAINED`` (e.g. ``open_clip:ViT-L-14/laion2b_s32b_b82k`` for LAION-5B)
  when ``open_clip_torch`` is installed.

Heavy dependencies (torch, transformers, Pillow) are the ``[clip]`` extra, imported only when
an encoder is first used. Encoders live in a registry keyed by scheme, so a new family plugs in
with :func:`register` without touching callers.

Where a model loads from is decided before torch is imported (:func:`hub_access`): a local
directory and offline mode (``HF_HUB_OFFLINE``) never touch the network, not even DNS; a hub id
costs one bounded probe of the hub (:data:`HUB_PROBE_SECONDS`), and when the hub does not answer
it loads from the local cache only. A model that is not there fails at once with one line that
says how to point at a local copy, instead of the hub client's five retries (~30 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from laion_search.errors import EncoderError, UsageError
from laion_search.clip.images import load_image

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
ENV_MODEL = "LAION_CLIP_MODEL"
INSTALL_HINT = "pip install 'laion-search[clip]'  (torch, transformers, pillow)"
MAX_TEXT_CHARS = 10_000  # CLIP reads 77 tokens; longer text is cut long before tokenizing
#: Seconds the hub probe may take, name lookup and TCP connect together: a reachable hub answers
#: in a fraction of this, and a lookup that hangs (no resolver) must not hold a query for longer.
HUB_PROBE_SECONDS = 1.0
#: A Hugging Face repo id (``owner/name`` or ``name``), as the hub client accepts them.
_REPO_ID_RE = re.compile(r"^(?:[\w.-]{1,96}/)?[\w.-]{1,96}$")

# OpenAI CLIP's image normalisation (used when a model directory has no preprocessor config)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Encoder(Protocol):
    name: str
    dim: int

    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray: ...

    def encode_image(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray: ...


_FACTORIES: dict[str, Callable[[str], Encoder]] = {}
_CACHE: dict[str, Encoder] = {}
_LOCK = threading.Lock()


def register(scheme: str) -> Callable[[Callable[[str], Encoder]], Callable[[str], Encoder]]:
    """Register a factory for model names ``"<scheme>:<rest>"`` (``""`` is the default family)."""

    def deco(factory: Callable[[str], Encoder]) -> Callable[[str], Encoder]:
        _FACTORIES[scheme] = factory
        return factory

    return deco


def resolve_model(model: str | os.PathLike[str] | None = None) -> str:
    return str(model) if model else os.environ.get(ENV_MODEL) or DEFAULT_MODEL


def get_encoder(model: str | os.PathLike[str] | None = None) -> Encoder:
    """The encoder for ``model`` (default: ``$LAION_CLIP_MODEL`` or OpenAI CLIP ViT-B/32),
    loaded once per process and reused."""
    name = resolve_model(model)
    with _LOCK:
        enc = _CACHE.get(name)
        if enc is None:
            scheme, _, rest = name.partition(":")
            if rest and scheme in _FACTORIES and not Path(name).exists():
                enc = _FACTORIES[scheme](rest)
            else:
                enc = _FACTORIES[""](name)
            _CACHE[name] = enc
        return enc


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n == 0, 1, n)


def _import_torch_stack():
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise EncoderError(f"CLIP encoders need torch and transformers ({exc.name} is missing): {INSTALL_HINT}") from None
    transformers.utils.logging.set_verbosity_error()  # no load banners or progress bars on our stderr
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


class HFClipEncoder:
    """A CLIP model in Hugging Face format (hub id or local directory)."""

    def __init__(self, model: str):
        local_only = hub_access(model)  # before torch: a model that is not here fails in milliseconds
        torch, transformers = _import_torch_stack()
        self.name = model
        self._torch = torch
        try:
            with hub_offline(local_only):
                self.model = transformers.CLIPModel.from_pretrained(model, local_files_only=local_only)
                self.tokenizer = transformers.CLIPTokenizer.from_pretrained(model, local_files_only=local_only)
        except (OSError, ValueError) as exc:
            # the library's first line may end with a full stop: one, not "files.. Without"
            raise EncoderError(f"cannot load CLIP model {model!r}: {str(exc).splitlines()[0].rstrip('. ')}",
                               fix=local_copy_fix(model)) from None
        self.model.eval()
        cfg = self.model.config
        self.dim = int(cfg.projection_dim)
        self.max_tokens = int(cfg.text_config.max_position_embeddings)
        self.image_size = int(cfg.vision_config.image_size)
        self.mean, self.std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
        pre = Path(model) / "preprocessor_config.json"
        if pre.is_file():
            try:
                conf = json.loads(pre.read_text())
                self.mean = np.array(conf.get("image_mean", CLIP_MEAN), np.float32)
                self.std = np.array(conf.get("image_std", CLIP_STD), np.float32)
            except ValueError:
                pass
        self._lock = threading.Lock()  # torch modules are not re-entrant across threads

    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        torch = self._torch
        texts = [_check_text(t) for t in texts]
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                                   max_length=self.max_tokens, return_tensors="pt")
            with self._lock, torch.inference_mode():
                feats = self.model.get_text_features(input_ids=batch["input_ids"],
                                                     attention_mask=batch["attention_mask"])
            out.append(_features(feats))
        return normalise(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)

    def encode_image(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        torch = self._torch
        out = []
        for i in range(0, len(images), batch_size):
            pixels = np.stack([self.preprocess(load_image(im)) for im in images[i:i + batch_size]])
            with self._lock, torch.inference_mode():
                feats = self.model.get_image_features(pixel_values=torch.from_numpy(pixels))
            out.append(_features(feats))
        return normalise(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)

    def preprocess(self, img: Any) -> np.ndarray:
        """OpenAI CLIP's transform without torchvision: resize the short side (bicubic),
        centre-crop, scale to [0, 1], normalise; returns CHW float32."""
        from PIL import Image

        size = self.image_size
        w, h = img.size
        # the long side as transformers' CLIPImageProcessor and torchvision's Resize compute it:
        # truncated, not rounded (a 100×30 image becomes 106×32, not 107×32)
        if w <= h:
            new = (size, int(size * h / w))
        else:
            new = (int(size * w / h), size)
        img = img.resize(new, Image.Resampling.BICUBIC)
        w, h = img.size
        # the centre crop as OpenAI CLIP's (torchvision's CenterCrop) computes it, which made
        # LAION's vectors: offsets rounded, not floored (transformers floors: one pixel apart
        # when the overhang is 3, 7, 11, ... pixels)
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = (arr - self.mean) / self.std
        return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _hub_id(model: str, fallback: str | None = None) -> str:
    """The hub id to download for a failed load: the model itself when it looks like one, else
    ``fallback`` (the model that fits the table), else the default."""
    return model if model.count("/") == 1 and not Path(model).exists() and not model.startswith((".", "/")) \
        else fallback or DEFAULT_MODEL


#: The folder the fix sentences name for a local copy of LAION's models.
LOCAL_DIRS = {"openai/clip-vit-base-patch32": "./clip-b32", "openai/clip-vit-large-patch14": "./clip-l14"}


def download_fix(hub_id: str) -> str:
    """The one sentence a server says for a model it cannot load: fetch ``hub_id`` elsewhere, restart with it."""
    folder = LOCAL_DIRS.get(hub_id, "./clip-model")
    return (f"on a machine with internet run `hf download {hub_id} --local-dir {folder}`, "
            f"copy {folder} here and restart with `--model {folder}` (or set LAION_CLIP_MODEL)")


def local_copy_fix(model: str) -> str:
    """The one sentence that says how to point at a local copy of ``model``."""
    return (f"Without internet, download it on another machine (hf download {_hub_id(model)} --local-dir "
            "./clip-model), copy the folder here and pass --model ./clip-model (or set LAION_CLIP_MODEL)")


def offline_mode() -> bool:
    """Whether the model hub is switched off: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` as
    the user set them, or :func:`go_offline` earlier in this process."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        import huggingface_hub.constants as hub_constants  # light: no torch, no network
    except ImportError:
        return False
    return bool(hub_constants.HF_HUB_OFFLINE)


def hub_access(model: str) -> bool:
    """Where ``model`` loads from, decided before anything heavy is imported: returns True when
    the load must stay off the network (a local directory, offline mode, an unreachable hub) and
    False when the hub may be asked. Raises :class:`EncoderError` at once, with the fix, when the
    model cannot be there: a path that does not exist, or a hub id missing from the local cache
    while the hub is off or unreachable. A local directory or offline mode makes no network call,
    not even a name lookup; otherwise one bounded probe (:func:`hub_reachable`) decides."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise EncoderError(f"cannot load CLIP model {model!r}: not a directory (a CLIP model is a folder with "
                               "config.json, weights and tokenizer files)", fix=local_copy_fix(model))
        return True
    if not _REPO_ID_RE.match(model) or ".." in model or model.startswith((".", "~")):
        raise EncoderError(f"cannot load CLIP model {model!r}: no such directory", fix=local_copy_fix(model))
    if offline_mode():
        why = "the model hub is switched off (HF_HUB_OFFLINE)"
    elif not hub_reachable():
        why = f"the model hub ({hub_endpoint()}) is unreachable"
    else:
        return False
    if not _in_hub_cache(model):
        raise EncoderError(f"cannot load CLIP model {model!r}: {why} and the model is not in the local cache",
                           fix=local_copy_fix(model))
    return True


def _in_hub_cache(model: str) -> bool:
    """Whether the hub client's local cache holds ``model`` (its config, at least)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # without the hub client nothing can load a hub id anyway
        return False
    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except ValueError:  # not a valid repo id after all
        return False


@contextlib.contextmanager
def hub_offline(on: bool = True):
    """While the block runs, the hub client makes no request at all when ``on`` (transformers'
    ``local_files_only`` alone still lets it fetch metadata of its own, e.g. its user agent's)."""
    if not on:
        yield
        return
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:
        yield
        return
    before = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = before


def _features(feats: Any) -> np.ndarray:
    # transformers ≥ 5 returns a model output whose pooler_output holds the projected features
    tensor = feats if hasattr(feats, "detach") else feats.pooler_output
    return tensor.detach().float().cpu().numpy()


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise UsageError("text queries must be strings")
    if not text.strip():
        raise UsageError("text query is empty")
    return text[:MAX_TEXT_CHARS]


@register("")
def _hf_factory(model: str) -> Encoder:
    return HFClipEncoder(model)


@register("open_clip")
def _open_clip_factory(spec: str) -> Encoder:
    return OpenClipEncoder(spec)


class OpenClipEncoder:
    """``open_clip:ARCH/PRETRAINED`` (e.g. LAION-5B's ``ViT-L-14/laion2b_s32b_b82k``)."""

    def __init__(self, spec: str):
        torch, _ = _import_torch_stack()
        try:
            import open_clip
        except ImportError:
            raise EncoderError("open_clip models need open_clip_torch: pip install open_clip_torch") from None
        arch, _, pretrained = spec.partition("/")
        # a checkpoint file needs no hub; a pretrained tag comes from the hub or its cache, and
        # with the hub off or silent only the cache is asked (no retries)
        local_only = bool(pretrained) and Path(pretrained).expanduser().is_file()
        if pretrained and not local_only and (offline_mode() or not hub_reachable()):
            local_only = True
        try:
            with hub_offline(local_only):
                model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
        except Exception as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(". ")
            raise EncoderError(f"cannot load open_clip model {spec!r}: {first}",
                               fix="Without internet, pass a local checkpoint file: --model open_clip:ARCH/PATH.bin"
                               if local_only else None) from None
        self.name = f"open_clip:{spec}"
        self._torch, self.model, self._preprocess = torch, model.eval(), preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.dim = int(model.text_projection.shape[1]) if hasattr(model, "text_projection") else 512
        self._lock = threading.Lock()

    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        texts = [_check_text(t) for t in texts]
        out = []
        for i in range(0, len(texts), batch_size):
            with self._lock, self._torch.inference_mode():
                out.append(self.model.encode_text(self.tokenizer(texts[i:i + batch_size])).float().numpy())
        return normalise(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)

    def encode_image(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            batch = self._torch.stack([self._preprocess(load_image(im)) for im in images[i:i + batch_size]])
            with self._lock, self._torch.inference_mode():
                out.append(self.model.encode_image(batch).float().numpy())
        return normalise(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)


# -- start-up check (servers) ---------------------------------------------------------------------
DOWNLOAD_FIX = download_fix(DEFAULT_MODEL)


@dataclass
class EncoderCheck:
    """What a start-up check of the CLIP encoder found: ``ok``, or the ``reason`` it cannot
    load and the one-line ``fix``."""

    model: str
    ok: bool
    dim: int | None = None
    reason: str | None = None
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "ok": self.ok, "dim": self.dim, "reason": self.reason, "fix": self.fix}


def check_encoder(model: str | os.PathLike[str] | None = None, *, fits: str | None = None) -> EncoderCheck:
    """Load the encoder once (a long-running process calls this at start-up). Where it loads
    from is decided as for every load (:func:`hub_access`: no retries against a silent hub); when
    it cannot load, the model hub is switched off for the rest of the process
    (``HF_HUB_OFFLINE``), so nothing later asks the network again, and the reason and the fix are
    returned, not raised. ``fits``: the hub id of the model that fits the table, which the fix
    names when ``model`` is not a hub id itself (a missing directory)."""
    name = resolve_model(model)
    try:
        enc = get_encoder(name)
    except EncoderError as exc:
        go_offline()
        if "need torch" in exc.reason or "open_clip_torch" in exc.reason:
            text = str(exc)
            return EncoderCheck(name, False, reason=text.split(":")[0], fix=text.rsplit(": ", 1)[-1])
        return EncoderCheck(name, False, reason=exc.reason, fix=download_fix(_hub_id(name, fits)))
    return EncoderCheck(name, True, dim=int(enc.dim))


def hub_endpoint() -> str:
    """The model hub the hub client talks to: ``$HF_ENDPOINT``, default https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the model hub (or the proxy the hub client would use for it) accepts a TCP
    connection within ``timeout`` seconds, the name lookup included: a lookup runs in a helper
    thread, because ``getaddrinfo`` has no timeout of its own and hangs for ~10 s without a
    resolver. One connection attempt per address, no retries."""
    import socket
    import time
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(hub_endpoint())
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
    deadline = time.monotonic() + timeout
    found: list[Any] = []

    def lookup() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError):
            pass

    resolver = threading.Thread(target=lookup, name="laion-hub-lookup", daemon=True)
    resolver.start()
    resolver.join(timeout)
    for family, kind, proto, _, address in list(found) if not resolver.is_alive() else []:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(left)
                sock.connect(address)
                return True
        except OSError:
            continue
    return False


def go_offline() -> None:
    """No more model-hub requests from this process (no retries at request time)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - without the hub library nothing can call it
        pass
