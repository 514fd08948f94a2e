"""Without a reachable model hub, a text or image query fails at once with one line that says how
to point at a local model: no retry storm against a silent hub, and no network call at all (not
even a name lookup) for a local model directory or in offline mode. Network use is counted on
the socket layer, never timed."""

from __future__ import annotations

import socket
import threading

import pytest

pytest.importorskip("huggingface_hub")

import huggingface_hub.constants as hub_constants  # noqa: E402

from laion_search.clip import encoders  # noqa: E402
from laion_search.errors import EncoderError  # noqa: E402

from .conftest import free_port, run_cli  # noqa: E402

NOT_CACHED = "laion-search-tests/no-such-clip-model"  # a hub id no cache holds


@pytest.fixture
def network(monkeypatch):
    """Every name lookup and TCP connection attempt this process makes, as (kind, target)."""
    seen: list[tuple[str, object]] = []
    real_lookup, real_connect = socket.getaddrinfo, socket.socket.connect

    def lookup(host, *args, **kwargs):
        seen.append(("lookup", host))
        return real_lookup(host, *args, **kwargs)

    def connect(self, address):
        seen.append(("connect", address))
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


@pytest.fixture
def silent_hub(monkeypatch):
    """The hub is a closed loopback port, online mode as a user has it by default; the env and
    the hub client's flag are restored after (a failed server check switches them on)."""
    port = free_port()  # bound, then closed: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
                "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    return ("127.0.0.1", port)


def _assert_one_line_with_the_fix(exc: EncoderError, model: str) -> None:
    text = str(exc)
    assert "\n" not in text and ".." not in text, text
    assert text.startswith(f"cannot load CLIP model {model!r}: ")
    assert "--model ./clip-model" in text and "LAION_CLIP_MODEL" in text, text


def test_a_silent_hub_is_probed_once_then_the_load_fails_at_once(silent_hub, network):
    with pytest.raises(EncoderError) as err:
        encoders.get_encoder(NOT_CACHED)
    _assert_one_line_with_the_fix(err.value, NOT_CACHED)
    assert "is unreachable and the model is not in the local cache" in str(err.value)
    assert f"hf download {NOT_CACHED}" in str(err.value)
    # one probe, and not one of the hub client's retries (it would connect to the same port)
    assert [t for kind, t in network if kind == "connect"] == [silent_hub], network


def test_offline_mode_makes_no_network_call(silent_hub, network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderError) as err:
        encoders.get_encoder(NOT_CACHED)
    _assert_one_line_with_the_fix(err.value, NOT_CACHED)
    assert "switched off (HF_HUB_OFFLINE)" in str(err.value)
    assert network == []


def test_a_missing_model_directory_fails_without_the_network(silent_hub, network, tmp_path):
    for missing in (str(tmp_path / "clip-b32"), "./no-such-clip-dir"):
        with pytest.raises(EncoderError, match="no such directory") as err:
            encoders.get_encoder(missing)
        _assert_one_line_with_the_fix(err.value, missing)
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(EncoderError, match="not a directory"):
        encoders.get_encoder(str(a_file))
    assert network == []


def test_a_local_model_loads_without_the_network(silent_hub, network, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from laion_search.clip.tiny import make_clip_model

    model = str(make_clip_model(tmp_path / "tiny", "tiny"))
    network.clear()  # making the model is not what is measured
    enc = encoders.get_encoder(model)
    assert enc.dim == 16 and enc.encode_text(["a dog"]).shape == (1, 16)
    assert network == []


def test_the_server_check_fails_at_once_and_switches_the_hub_off(silent_hub, network):
    check = encoders.check_encoder(NOT_CACHED)
    assert not check.ok and check.model == NOT_CACHED
    assert check.reason == (f"cannot load CLIP model {NOT_CACHED!r}: the model hub (http://127.0.0.1:{silent_hub[1]}) "
                            "is unreachable and the model is not in the local cache")
    # the fix names the model asked for (a hub id), not the default
    assert f"hf download {NOT_CACHED} --local-dir ./clip-model" in check.fix and "--model ./clip-model" in check.fix
    assert [t for kind, t in network if kind == "connect"] == [silent_hub]
    assert encoders.offline_mode()  # nothing later in this process asks the hub again
    network.clear()
    assert not encoders.check_encoder(NOT_CACHED).ok and network == []


def test_the_hub_probe_gives_up_on_a_lookup_that_hangs(monkeypatch):
    release = threading.Event()

    def hanging_lookup(*args, **kwargs):  # as without a resolver: getaddrinfo has no timeout
        release.wait(60)
        raise socket.gaierror("no resolver")

    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    try:
        assert encoders.hub_reachable(timeout=0.05) is False
    finally:
        release.set()


def test_the_hub_probe_connects_through_the_proxy_the_client_would_use(monkeypatch, network):
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        assert encoders.hub_reachable()
    assert ("lookup", "hub.invalid") not in network


def test_cli_text_search_without_a_hub_is_one_line(tmp_path, silent_hub):
    from laion_search.sources.synth import synth

    synth(tmp_path / "shards", [0], 50, dim=512, seed=3)
    run_cli("ingest", str(tmp_path / "shards"), "--db", str(tmp_path / "db"), check=True)
    env = {"HF_ENDPOINT": f"http://{silent_hub[0]}:{silent_hub[1]}", "HF_HOME": str(tmp_path / "hf-home"),
           "LAION_CLIP_MODEL": ""}
    r = run_cli("search", "--db", str(tmp_path / "db"), "--text", "a dog", env=env)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: cannot load CLIP model 'openai/clip-vit-base-patch32': the model hub")
    assert "--model ./clip-model" in lines[0] and "Retry" not in r.stderr and ".." not in lines[0]
