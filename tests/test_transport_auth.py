"""Secrets, proofs and addresses of the data plane."""

from __future__ import annotations

import pytest

from dvla.config import DataPlaneConfig, parse_config
from dvla.errors import ConfigError
from dvla.transport import auth
from dvla.transport.endpoints import Address


def test_secret_never_shows_in_reprs_or_config_dumps() -> None:
    s = auth.Secret(b"super-secret-value-123")
    assert "super" not in repr(s) and "super" not in str(s)
    cfg = DataPlaneConfig(secret="super-secret-value-123")  # type: ignore[arg-type]
    assert "super" not in str(cfg.model_dump(mode="json"))
    assert "super" not in repr(cfg)


def test_secret_resolution_errors_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DVLA_TEST_SECRET", raising=False)
    with pytest.raises(ConfigError, match=r"no data-plane secret: set data_plane\.secret or the"):
        auth.Secret.resolve(None, "DVLA_TEST_SECRET")
    monkeypatch.setenv("DVLA_TEST_SECRET", "short")
    with pytest.raises(ConfigError, match="at least 16"):
        auth.Secret.resolve(None, "DVLA_TEST_SECRET")
    monkeypatch.setenv("DVLA_TEST_SECRET", "long-enough-secret-from-env")
    assert auth.Secret.resolve(None, "DVLA_TEST_SECRET").value == b"long-enough-secret-from-env"
    assert auth.Secret.resolve("configured-wins-over-env", "DVLA_TEST_SECRET").value == (
        b"configured-wins-over-env"
    )


def test_proofs_bind_role_secret_and_both_nonces() -> None:
    s, other = auth.Secret(b"0123456789abcdef"), auth.Secret(b"0123456789abcdeX")
    nc, ns = auth.new_nonce(), auth.new_nonce()
    p = auth.proof(s, "client", nc, ns)
    assert auth.verify(s, "client", nc, ns, p)
    assert not auth.verify(other, "client", nc, ns, p)  # wrong secret
    assert not auth.verify(s, "server", nc, ns, p)  # reflected as the other role
    assert not auth.verify(s, "client", ns, nc, p)  # nonces swapped
    assert not auth.verify(s, "client", nc, auth.new_nonce(), p)  # replayed on a new link
    # The published test vector of docs/protocol.md.
    vec = auth.proof(s, "client", bytes(range(32)), bytes(range(32, 64)))
    assert vec.hex() == "83a50c56b0a7b43be60326c7b30947e5ecb55437c3d550c3f36c16f3501862f7"


def test_addresses_round_trip_and_reject_nonsense() -> None:
    a = Address("tcp", "10.0.0.2", 5555, "/tmp/x y.sock", "abcd")
    assert Address.parse(a.url()) == a
    assert Address.parse("unix:///run/dvla.sock") == Address("unix", path="/run/dvla.sock")
    for bad in ["http://x:1", "tcp://nohost", "tcp://:5", "mem://", "garbage"]:
        with pytest.raises(ConfigError, match="data-plane address"):
            Address.parse(bad)


def test_data_plane_config_is_validated_with_one_line_errors() -> None:
    base = {
        "simulator": {"name": "toy"},
        "model": {"name": "tiny-vla"},
        "algorithm": {"name": "grpo"},
        "optimizer": {"name": "adamw"},
    }
    with pytest.raises(ConfigError, match=r"data_plane.transport: Input should be"):
        parse_config({**base, "data_plane": {"transport": "carrier-pigeon"}}, "f.yaml")
    with pytest.raises(ConfigError, match="heartbeat_timeout_s must exceed"):
        parse_config(
            {**base, "data_plane": {"heartbeat_interval_s": 5, "heartbeat_timeout_s": 2}}, "f.yaml"
        )
    with pytest.raises(ConfigError, match="sample_processes needs mode: async"):
        parse_config({**base, "pipeline": {"mode": "sync", "sample_processes": 1}}, "f.yaml")
