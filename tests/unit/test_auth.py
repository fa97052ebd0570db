"""API keys: stored as sha256 digests, compared with hmac.compare_digest, open mode when none."""

import hashlib
import logging

import pytest

from serving.config import AuthConfig
from serving.errors import AuthenticationError, PermissionDenied
from serving.ingress.auth import Authenticator, Principal, hash_key

KEYS = {"acme": ["sk-acme-1", "sk-acme-2"], "globex": ["sk-globex"]}


def auth(admin: str | None = "sk-admin") -> Authenticator:
    return Authenticator(AuthConfig(
        admin_key_sha256=hash_key(admin) if admin else None,
        tenants={"acme": {"api_keys_sha256": [hash_key(k) for k in KEYS["acme"]], "allowed_regions": ["eu"]},
                 "globex": {"api_keys_sha256": [hash_key(k) for k in KEYS["globex"]]}}))


def test_hash_key_is_sha256_hex():
    assert hash_key("sk-x") == hashlib.sha256(b"sk-x").hexdigest()


CASES = [
    ("first-key", "Bearer sk-acme-1", Principal("acme", frozenset({"eu"}))),
    ("second-key", "Bearer sk-acme-2", Principal("acme", frozenset({"eu"}))),
    ("other-tenant", "Bearer sk-globex", Principal("globex", None)),
    ("scheme-case", "bearer sk-globex", Principal("globex", None)),
    ("wrong-key", "Bearer sk-acme-3", AuthenticationError),
    ("prefix-of-key", "Bearer sk-acme-", AuthenticationError),
    ("digest-instead-of-key", "Bearer " + hash_key("sk-acme-1"), AuthenticationError),
    ("no-scheme", "sk-acme-1", AuthenticationError),
    ("missing", None, AuthenticationError),
    ("admin-key-is-not-a-tenant", "Bearer sk-admin", AuthenticationError),
]


@pytest.mark.parametrize("header,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_authenticate(header, expected):
    a = auth()
    if isinstance(expected, Principal):
        assert a.authenticate(header) == expected
    else:
        with pytest.raises(expected) as e:
            a.authenticate(header)
        assert e.value.status == 401 and "sk-" not in e.value.message  # never echo a key


def test_admin_key():
    a = auth()
    a.require_admin("Bearer sk-admin")
    with pytest.raises(AuthenticationError):
        a.require_admin("Bearer sk-acme-1")
    with pytest.raises(PermissionDenied):  # tenants exist but no admin key: admin endpoints are off
        auth(admin=None).require_admin("Bearer sk-acme-1")


def test_open_mode_says_so_once_and_lets_everyone_in(caplog):
    with caplog.at_level(logging.WARNING, logger="proxima.auth"):
        a = Authenticator(AuthConfig())
    assert a.open
    assert [r.getMessage() for r in caplog.records] == \
           ["no API keys configured: the gateway is OPEN, every request is tenant 'default'"]
    assert a.authenticate(None) == Principal("default")
    assert a.authenticate("Bearer whatever") == Principal("default")
    a.require_admin(None)  # an open gateway's admin view is open too


def test_every_stored_digest_is_compared(monkeypatch):
    """No early exit: a match on the first entry still compares all of them (timing)."""
    import serving.ingress.auth as mod
    calls = []
    real = mod.hmac.compare_digest

    class H:
        @staticmethod
        def compare_digest(a, b):
            calls.append(1)
            return real(a, b)
    a = auth()
    monkeypatch.setattr(mod, "hmac", H)
    a.authenticate("Bearer sk-acme-1")
    assert len(calls) == 3


@pytest.mark.parametrize("tenants,admin,fragment", [
    ({"acme": ["sk-1"], "zeta": ["sk-1"]}, None, "tenants 'acme' and 'zeta'"),
    ({"acme": ["sk-1"]}, "sk-1", "also tenant 'acme'"),
    ({"acme": [""]}, None, "empty string"),
    ({"acme": ["sk-1"]}, "", "empty string"),
], ids=["two-tenants", "tenant-and-admin", "empty-tenant-key", "empty-admin-key"])
def test_a_key_hash_names_one_principal_and_never_the_empty_key(tenants, admin, fragment):
    with pytest.raises(ValueError, match=fragment):
        AuthConfig(admin_key_sha256=None if admin is None else hash_key(admin),
                   tenants={t: {"api_keys_sha256": [hash_key(k) for k in keys]} for t, keys in tenants.items()})
    AuthConfig(tenants={"acme": {"api_keys_sha256": [hash_key("sk-1"), hash_key("sk-1")]}})  # its own twice: fine
