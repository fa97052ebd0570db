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
