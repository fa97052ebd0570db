"""Per-tenant cache salts: isolation by default, sharing only between opted-in tenants."""

import pytest

from serving.admission.tenancy import PRIVATE, SHARED, cache_salt
from serving.engines.tokenizer import encode
from serving.prefix.hashing import block_hashes

PROMPT = encode(" ".join(f"w{i}" for i in range(64)))  # 64 tokens: 4 full blocks


@pytest.mark.parametrize("a,b,same", [
    (("acme", PRIVATE), ("beta", PRIVATE), False),
    (("acme", PRIVATE), ("acme", PRIVATE), True),
    (("acme", SHARED), ("beta", SHARED), True),
    (("acme", SHARED), ("beta", PRIVATE), False),
], ids=["tenants-isolated", "tenant-stable", "opted-in-share", "opt-in-is-mutual"])
def test_prefix_hashes_shared_only_when_salts_match(a, b, same):
    ha = block_hashes(PROMPT, 16, "m", cache_salt(a[0], "s3cret", a[1]))
    hb = block_hashes(PROMPT, 16, "m", cache_salt(b[0], "s3cret", b[1]))
    assert len(ha) == 4 and (ha == hb) is same and (set(ha) & set(hb) == set()) is not same


def test_salt_depends_on_server_secret():
    assert cache_salt("acme", "one") != cache_salt("acme", "two")
    with pytest.raises(ValueError, match="cache scope"):
        cache_salt("acme", "one", "public")


def test_the_salt_secret_can_come_from_the_environment(monkeypatch):
    """Ray Serve writes an application's arguments (the config) to its controller's log: the
    secret can stay out of them, named by its environment variable."""
    from serving.config import ConfigError, load_config

    base = {"home_region": "us", "models": [{"name": "m"}], "regions": {"us": {"replicas": 1}}}
    monkeypatch.setenv("PROXIMA_SALT", "from-env")
    cfg = load_config({**base, "auth": {"cache_salt_secret_env": "PROXIMA_SALT"}})
    assert cfg.auth.salt_secret() == "from-env" and "from-env" not in cfg.model_dump_json()
    assert load_config(base).auth.salt_secret() == "proxima"
    with pytest.raises(ConfigError, match="not both"):
        load_config({**base, "auth": {"cache_salt_secret_env": "PROXIMA_SALT", "cache_salt_secret": "x"}})
    monkeypatch.delenv("PROXIMA_SALT")
    with pytest.raises(ConfigError, match="'PROXIMA_SALT' is not set"):
        load_config({**base, "auth": {"cache_salt_secret_env": "PROXIMA_SALT"}})
