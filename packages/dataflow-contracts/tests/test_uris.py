import pytest

from dataflow.contracts import InvalidInputError
from dataflow.contracts.uris import parse_ledger_uri, parse_store_uri


def test_path_schemes():
    assert parse_ledger_uri("sqlite:///tmp/run/ledger.db").location == "/tmp/run/ledger.db"
    assert parse_ledger_uri("sqlite://ledger.db").location == "ledger.db"
    parsed = parse_store_uri("dir:///mnt/share/run?token_env=TOK")
    assert (parsed.scheme, parsed.location, dict(parsed.options)) == (
        "dir",
        "/mnt/share/run",
        {"token_env": "TOK"},
    )
    assert parse_store_uri("file:///data/features").location == "/data/features"


def test_network_schemes():
    r = parse_ledger_uri("redis://127.0.0.1:6390/2?timeout=3")
    assert (r.host, r.port, r.database, r.options["timeout"]) == ("127.0.0.1", 6390, 2, "3")
    assert parse_ledger_uri("redis://localhost").port == 6379
    m = parse_store_uri("mooncake://127.0.0.1:50051")
    assert (m.host, m.port, m.location) == ("127.0.0.1", 50051, "127.0.0.1:50051")


def test_named_schemes():
    assert parse_store_uri("memory://").location == ""
    assert parse_store_uri("shm://run7").location == "run7"
    assert parse_ledger_uri("noop://").scheme == "noop"
    assert parse_ledger_uri("MEMORY://x").scheme == "memory"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "must be a non-empty str"),
        (None, "must be a non-empty str"),
        ("/tmp/ledger.db", "has no scheme"),
        ("postgres://x/y", "unknown ledger scheme 'postgres'"),
        ("shm://x", "unknown ledger scheme 'shm'"),
        ("sqlite://", "needs a path"),
        ("sqlite:///", "needs a path"),
        ("redis://", "needs a host"),
        ("redis://h:99999", "invalid port"),
        ("redis://h:1/abc", "database must be a number"),
        ("memory://a/b", "must not contain '/'"),
        ("memory://../x", "must not contain '/'"),
        ("sqlite:///tmp/x#frag", "#fragment"),
        ("sqlite:///tmp/x\n", "control character"),
    ],
)
def test_bad_ledger_uris(uri, message):
    with pytest.raises(InvalidInputError, match=None) as info:
        parse_ledger_uri(uri)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("sqlite:///x", "unknown store scheme 'sqlite'"),
        ("dir://", "needs a path"),
        ("mooncake://", "needs a host"),
        ("mooncake://h:1/path", "must not have a path"),
        ("shm://..", "must not start with '.'"),
        ("s3://bucket", "unknown store scheme"),
    ],
)
def test_bad_store_uris(uri, message):
    with pytest.raises(InvalidInputError) as info:
        parse_store_uri(uri)
    assert message in str(info.value)
