"""Pure pieces of the directory adapter: entry parsing, disabled flags, DN keys, escaping."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.config import DirectoryConfig, PolicyConfig
from daemon.directory import LdapDirectory, Secret, normalize_dn
from daemon.errors import ConfigError
from daemon.model import SkippedEntry


def adapter(flavor: str = "openldap", **kw: Any) -> LdapDirectory:
    cfg = DirectoryConfig(urls=("ldap://127.0.0.1:1",), base_dn="dc=x", flavor=flavor, **kw)
    return LdapDirectory(cfg, PolicyConfig())


def entry(dn: str, **attrs: list[bytes]) -> dict[str, Any]:
    return {"dn": dn, "raw_attributes": attrs}


def test_non_utf8_and_multi_valued_names_are_skipped() -> None:
    d = adapter()
    skipped: list[SkippedEntry] = []
    assert d._parse_user(entry("uid=x,dc=x", uid=[b"\xff\xfe"]), skipped) is None
    assert d._parse_user(entry("uid=y,dc=x", uid=[b"a", b"b"]), skipped) is None
    assert d._parse_user(entry("uid=z,dc=x", uid=[b"tab\there"]), skipped) is None
    assert [s.why for s in skipped] == ["uid is not UTF-8", "several values of uid",
                                        "unusable uid"]
    u = d._parse_user(entry("uid=Al,dc=x", uid=[b"Al"]), skipped)
    assert u is not None and u.username == "al"


@pytest.mark.parametrize("flavor,attrs,disabled", [
    ("ad", {"userAccountControl": [b"512"]}, False),
    ("ad", {"userAccountControl": [b"514"]}, True),
    ("ad", {"userAccountControl": [b"66050"]}, True),
    ("ad", {"userAccountControl": [b"garbage"]}, True),
    ("openldap", {"pwdAccountLockedTime": [b"000001010000Z"]}, True),
    ("openldap", {}, False),
    ("389ds", {"nsAccountLock": [b"TRUE"]}, True),
    ("389ds", {"nsAccountLock": [b"false"]}, False),
    ("generic", {"pwdAccountLockedTime": [b"x"]}, False),
])
def test_disabled_flags_per_flavor(flavor: str, attrs: dict[str, list[bytes]],
                                   disabled: bool) -> None:
    assert adapter(flavor)._disabled(attrs) is disabled


def test_flavor_defaults_and_overrides() -> None:
    ad = adapter("ad")
    assert ad.username_attr == "sAMAccountName" and ad.in_chain and ad.range_retrieval
    custom = adapter("openldap", user_filter="(objectClass=posixAccount)",
                     username_attribute="cn", member_attributes=("member",))
    assert custom.user_filter == "(objectClass=posixAccount)"
    assert custom.username_attr == "cn" and custom.member_attrs == ("member",)


def test_bind_dn_without_password_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DirectoryConfig(urls=("ldap://h",), base_dn="dc=x", bind_dn="cn=svc,dc=x")
    with pytest.raises(ConfigError, match="no password"):
        LdapDirectory(cfg, PolicyConfig(), password=None)


def test_secret_never_shows() -> None:
    s = Secret("hunter2")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and s.reveal() == "hunter2"


def test_missing_ca_file_is_named() -> None:
    with pytest.raises(ConfigError, match=r"directory\.ca_file: /nope\.pem does not exist"):
        adapter(ca_file="/nope.pem")


@pytest.mark.parametrize("dn,key", [
    ("CN=Alice,OU=People,DC=Example,DC=org", "cn=alice,ou=people,dc=example,dc=org"),
    ("cn=Zo\\C3\\AB,dc=x", "cn=zoë,dc=x"),
])
def test_normalize_dn(dn: str, key: str) -> None:
    assert normalize_dn(dn) == key


@pytest.mark.parametrize("a,b", [
    ('cn="Smith, John",dc=x', "cn=Smith\\2C John,dc=x"),
    ("cn=a\\+b,dc=x", "cn=a\\2Bb,dc=x"),
    ("cn=x+uid=y,dc=z", "UID=Y + CN=X,dc=z"),
])
def test_equivalent_dns_share_a_key(a: str, b: str) -> None:
    assert normalize_dn(a) == normalize_dn(b)


@pytest.mark.parametrize("a,b", [
    ("cn=a\\,b,dc=x", "cn=a,cn=b,dc=x"),
    ("cn=a\\+cn=b,dc=x", "cn=a+cn=b,dc=x"),
])
def test_different_dns_have_different_keys(a: str, b: str) -> None:
    assert normalize_dn(a) != normalize_dn(b)


def test_a_referral_into_the_configured_base_is_an_error() -> None:
    """Entries behind a referral we do not follow would be missing: that is no complete read."""
    from daemon.errors import DirectoryUnavailable

    d = adapter()
    d._check_references("dc=x", ["ldap://other/DC=Example,DC=org"])  # outside: fine
    d._check_references("dc=x", ["ldap://x/CN=Configuration,dc=x",
                                 "ldap://x/DC=DomainDnsZones,dc=x"])  # AD partitions: fine
    with pytest.raises(DirectoryUnavailable, match="referred to"):
        d._check_references("dc=x", ["ldap://east/ou=people,dc=x"])
