"""config.py and the `check-config` / `--version` command line: defaults, strict loading, output."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from ingestd import __version__, cli
from ingestd.config import (
    AuthConfig,
    Config,
    TenantConfig,
    describe,
    from_mapping,
    load,
    parse_listen,
    reference_rows,
    resolve_tenancy,
)
from ingestd.errors import EXIT_CONFIG, ConfigError

REPO = Path(__file__).resolve().parents[2]

# Every key of the SPEC's config.toml, with the default the SPEC gives it.
SPEC_DEFAULTS = {
    ("http", "listen"): "127.0.0.1:8080",
    ("http", "max_body_bytes"): 1048576,
    ("auth", "tokens"): (),
    ("queue", "max_items"): 10000,
    ("workers", "count"): 2,
    ("batch", "max_payloads"): 1000,
    ("batch", "max_bytes"): 8388608,
    ("batch", "max_age_ms"): 1000,
    ("batch", "compression"): "gzip",
    ("sink", "kind"): "directory",
    ("sink", "path"): "./data/objects",
    ("spool", "path"): "./data/spool",
    ("spool", "durability"): "memory",
    ("shutdown", "drain_timeout_s"): 30,
}


def write(tmp_path: Path, text: str, name: str = "ingestd.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def refused(tmp_path: Path, text: str) -> tuple[Path, str]:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load(p)
    return p, str(exc.value)


def all_keys() -> list[tuple[str, str]]:
    out = []
    for table in dataclasses.fields(Config):
        if table.name in ("source", "tenancy"):
            continue
        for f in dataclasses.fields(get_type_hints(Config)[table.name]):
            out.append((table.name, f.name))
    return out


def reference_keys() -> list[str]:
    """all_keys, with the keys of each [[auth.tenants]] table after `auth.tenants`."""
    out = []
    for t, k in all_keys():
        out.append(f"{t}.{k}")
        if (t, k) == ("auth", "tenants"):
            out += [f"auth.tenants[].{f.name}" for f in dataclasses.fields(TenantConfig)]
    return out


# -- defaults ---------------------------------------------------------------------------------


def test_only_listen_gives_spec_defaults(tmp_path: Path) -> None:
    config = load(write(tmp_path, '[http]\nlisten = "127.0.0.1:9999"\n'))
    assert config.http.listen == "127.0.0.1:9999"
    assert config.source == str(tmp_path / "ingestd.toml")
    for (table, key), expected in SPEC_DEFAULTS.items():
        if (table, key) == ("http", "listen"):
            continue
        assert getattr(getattr(config, table), key) == expected, f"{table}.{key}"
    assert config.sink.kind == "directory"
    assert config.sink.path == "./data/objects"


def test_every_key_has_a_default_and_help() -> None:
    config = Config()
    for table, key in all_keys():
        section = getattr(config, table)
        f = {x.name: x for x in dataclasses.fields(section)}[key]
        assert f.default is not dataclasses.MISSING, f"{table}.{key} has no default"
        assert f.metadata["help"].strip(), f"{table}.{key} has no help"
    assert config.http.max_decoded_bytes >= config.http.max_body_bytes
    assert config.http.max_decoded_bytes < 1 << 30  # far below 1 GiB, per the SPEC


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    config = load(write(tmp_path, ""))
    assert dataclasses.replace(config, source="<defaults>") == Config()


def test_shipped_config_toml_loads() -> None:
    config = load(REPO / "config.toml")
    assert config.sink.kind == "directory"


def test_decoded_limit_defaults_to_a_few_times_the_body_limit(tmp_path: Path) -> None:
    # SPEC: "the decoded-size limit (default a few times `max_body_bytes`, far below 1 GiB)";
    # so raising only the raw limit must not make the file invalid
    config = load(write(tmp_path, "[http]\nmax_body_bytes = 8388608\n"))
    assert 2 * 8388608 <= config.http.max_decoded_bytes < 1 << 30
    small = load(write(tmp_path, "[http]\nmax_body_bytes = 1000\n", "small.toml"))
    assert 2 * 1000 <= small.http.max_decoded_bytes <= 16 * 1000
    assert tomllib.loads(describe(small))["http"]["max_decoded_bytes"] == small.http.max_decoded_bytes
    explicit = load(write(tmp_path, "[http]\nmax_body_bytes = 1000\nmax_decoded_bytes = 1500\n", "explicit.toml"))
    assert explicit.http.max_decoded_bytes == 1500


def test_int_accepted_where_float_is_asked(tmp_path: Path) -> None:
    config = load(write(tmp_path, "[shutdown]\ndrain_timeout_s = 5\n"))
    assert config.shutdown.drain_timeout_s == 5.0
    assert isinstance(config.shutdown.drain_timeout_s, float)


def test_zero_drain_timeout_is_allowed(tmp_path: Path) -> None:
    assert load(write(tmp_path, "[shutdown]\ndrain_timeout_s = 0\n")).shutdown.drain_timeout_s == 0.0


def test_tokens_list_becomes_tuple(tmp_path: Path) -> None:
    config = load(write(tmp_path, '[auth]\ntokens = ["a1", "b2"]\n'))
    assert config.auth.tokens == ("a1", "b2")


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key",
    [
        ("[nope]\nx = 1\n", "[nope]"),
        ("[http]\nbogus = 1\n", "[http].bogus"),
        ("[sink]\nbuckett = \"x\"\n", "[sink].buckett"),
        ('[queue]\nmax_items = "10"\n', "[queue].max_items"),
        ("[queue]\nmax_items = true\n", "[queue].max_items"),
        ("[queue]\nmax_items = 1.5\n", "[queue].max_items"),
        ("[queue]\nmax_items = -1\n", "[queue].max_items"),
        ("[queue]\nmax_items = 0\n", "[queue].max_items"),
        ("[workers]\ncount = 0\n", "[workers].count"),
        ("[batch]\nmax_age_ms = -5\n", "[batch].max_age_ms"),
        ('[batch]\ncompression = "brotli"\n', "[batch].compression"),
        ("[batch]\ngzip_level = 0\n", "[batch].gzip_level"),
        ("[batch]\ngzip_level = 10\n", "[batch].gzip_level"),
        ("[batch]\nzstd_level = 0\n", "[batch].zstd_level"),
        ("[batch]\nzstd_level = 20\n", "[batch].zstd_level"),
        ("[batch]\nmax_partitions = 0\n", "[batch].max_partitions"),
        ("[batch]\ntarget_object_bytes = -1\n", "[batch].target_object_bytes"),
        ('[batch]\nformat = "orc"\n', "[batch].format"),
        ('[batch]\nformat = "parquet"\nparquet_columns = { n = 5 }\n', "[batch].parquet_columns"),
        ('[batch]\nformat = "parquet"\nparquet_columns = ["n"]\n', "[batch].parquet_columns"),
        ('[sink]\nkey_template = "{prefix}/{day}"\n', "[sink].key_template"),
        ("[shutdown]\nlame_duck_s = -0.5\n", "[shutdown].lame_duck_s"),
        ('[sink]\nkind = "gcs"\n', "[sink].kind"),
        ("[sink]\nfsync = 1\n", "[sink].fsync"),
        ("[sink]\npath = 3\n", "[sink].path"),
        ('[spool]\ndurability = "paper"\n', "[spool].durability"),
        ("[shutdown]\ndrain_timeout_s = -1\n", "[shutdown].drain_timeout_s"),
        ('[shutdown]\ndrain_timeout_s = "30"\n', "[shutdown].drain_timeout_s"),
        ("[shutdown]\ndrain_timeout_s = true\n", "[shutdown].drain_timeout_s"),
        ('[log]\nlevel = "loud"\n', "[log].level"),
        ('[auth]\ntokens = "abc"\n', "[auth].tokens"),
        ("[auth]\ntokens = [1, 2]\n", "[auth].tokens"),
        ('[auth]\ntokens = ["has space"]\n', "[auth].tokens"),
        ('[auth]\ntokens = [""]\n', "[auth].tokens"),
        ('[http]\nlisten = "localhost"\n', "[http].listen"),
        ('[http]\nlisten = ":8080"\n', "[http].listen"),
        ('[http]\nlisten = "127.0.0.1:99999"\n', "[http].listen"),
        ('[http]\nlisten = "127.0.0.1:http"\n', "[http].listen"),
        ("[http]\nlisten = 8080\n", "[http].listen"),
        ("http = 1\n", "http"),
    ],
)
def test_bad_values_are_refused_naming_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    p, message = refused(tmp_path, text)
    assert str(p) in message
    assert key in message


def test_unknown_key_lists_the_known_ones(tmp_path: Path) -> None:
    _, message = refused(tmp_path, "[batch]\nmax_paylods = 3\n")
    assert "unknown key" in message
    assert "max_payloads" in message


def test_s3_without_bucket_is_refused(tmp_path: Path) -> None:
    p, message = refused(tmp_path, '[sink]\nkind = "s3"\n')
    assert str(p) in message and "[sink].bucket" in message
    assert load(write(tmp_path, '[sink]\nkind = "s3"\nbucket = "b"\n', "ok.toml")).sink.bucket == "b"


def test_decoded_limit_below_body_limit_is_refused(tmp_path: Path) -> None:
    p, message = refused(tmp_path, "[http]\nmax_body_bytes = 2000\nmax_decoded_bytes = 1999\n")
    assert str(p) in message and "max_decoded_bytes" in message
    ok = load(write(tmp_path, "[http]\nmax_body_bytes = 2000\nmax_decoded_bytes = 2000\n", "ok.toml"))
    assert ok.http.max_decoded_bytes == 2000


def test_missing_tokens_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tokens"
    p, message = refused(tmp_path, f'[auth]\ntokens_file = "{missing}"\n')
    assert str(p) in message and "[auth].tokens_file" in message and str(missing) in message


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    p, message = refused(tmp_path, "[http\nlisten = \n")
    assert str(p) in message and "TOML" in message


def test_missing_config_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nowhere.toml"):
        load(tmp_path / "nowhere.toml")


def test_from_mapping_uses_the_given_source() -> None:
    with pytest.raises(ConfigError, match=r"^somewhere\.toml: \[queue\]\.max_items"):
        from_mapping({"queue": {"max_items": -3}}, "somewhere.toml")


@pytest.mark.parametrize(
    "value, expected",
    [("127.0.0.1:8080", ("127.0.0.1", 8080)), ("0.0.0.0:0", ("0.0.0.0", 0)), ("[::1]:9000", ("::1", 9000)),
     ("localhost:65535", ("localhost", 65535))],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


# -- tokens -----------------------------------------------------------------------------------


def test_tokens_file_adds_to_the_default_tenant(tmp_path: Path) -> None:
    tf = tmp_path / "tokens"
    tf.write_text("# ops tokens\n\nalpha\n   \n  beta  \n  # indented comment\ngamma\n", encoding="utf-8")
    config = load(write(tmp_path, f'[auth]\ntokens = ["inline"]\ntokens_file = "{tf}"\n'))
    assert config.tenancy.tokens == (("inline", 0), ("alpha", 0), ("beta", 0), ("gamma", 0))
    assert config.tenancy.names == ("default",) and config.tenancy.auth_on


def test_no_token_anywhere_means_auth_off() -> None:
    assert not resolve_tenancy(AuthConfig()).auth_on
    assert Config().tenancy.names == ("default",)


@pytest.mark.parametrize("content", ["", "\n\n   \n", "# only a comment\n  # another\n"])
def test_a_tokens_file_without_a_token_is_refused_not_open(tmp_path: Path, content: str) -> None:
    tf = tmp_path / "tokens"
    tf.write_text(content, encoding="utf-8")
    p, message = refused(tmp_path, f'[auth]\ntokens_file = "{tf}"\n')
    assert str(p) in message and str(tf) in message and "holds no token" in message


@pytest.mark.parametrize("make", [lambda d: d,  # a directory: open() fails
                                  lambda d: (d / "bad").write_bytes(b"tok\xff\xfe\n") and d / "bad"])
def test_a_tokens_file_that_cannot_be_read_is_refused(tmp_path: Path, make: Any) -> None:
    folder = tmp_path / "tf"
    folder.mkdir()
    tf = make(folder)
    p, message = refused(tmp_path, f'[auth]\ntokens_file = "{tf}"\n')
    assert str(tf) in message and "cannot be read" in message


@pytest.mark.parametrize("line", ["two words", "tab\there", "ctl\x01char", "caf\u00e9"])
def test_a_token_with_stray_characters_in_the_tokens_file_is_refused(tmp_path: Path, line: str) -> None:
    tf = tmp_path / "tokens"
    tf.write_text(f"good-one\n{line}\n", encoding="utf-8")
    p, message = refused(tmp_path, f'[auth]\ntokens_file = "{tf}"\n')
    assert str(tf) in message and "line 2" in message


TENANTS = """
[auth]
tokens = ["flat"]
[[auth.tenants]]
name = "acme"
tokens = ["acme-1", "acme-2"]
max_payloads_per_s = 100
[[auth.tenants]]
name = "default"
tokens = ["dflt-2"]
max_payloads_per_s = 7
[[auth.tenants]]
name = "beta_2"
tokens = ["beta"]
"""


def test_tenants_map_their_tokens_and_default_adds_to_the_flat_ones(tmp_path: Path) -> None:
    config = load(write(tmp_path, TENANTS))
    t = config.tenancy
    assert t.names == ("default", "acme", "beta_2")
    assert [x.max_payloads_per_s for x in t.tenants] == [7, 100, 0]
    assert dict(t.tokens) == {"flat": 0, "acme-1": 1, "acme-2": 1, "dflt-2": 0, "beta": 2}


@pytest.mark.parametrize(("text", "expected"), [
    ('[[auth.tenants]]\nname = "a"\ntokens = ["x"]\n[[auth.tenants]]\nname = "b"\ntokens = ["x"]\n',
     "listed twice (also in tenant 'a')"),
    ('[auth]\ntokens = ["x"]\n[[auth.tenants]]\nname = "b"\ntokens = ["x"]\n', "listed twice (also in tenant 'default')"),
    ('[[auth.tenants]]\nname = "has space"\ntokens = ["x"]\n', "[auth].tenants[0].name: must match"),
    ('[[auth.tenants]]\nname = "%s"\ntokens = ["x"]\n' % ("n" * 65), "[auth].tenants[0].name: must match"),
    ('[[auth.tenants]]\nname = "../x"\ntokens = ["x"]\n', "[auth].tenants[0].name: must match"),
    ('[[auth.tenants]]\ntokens = ["x"]\n', "[auth].tenants[0].name: required"),
    ('[[auth.tenants]]\nname = "a"\n', "a tenant needs at least one token"),
    ('[[auth.tenants]]\nname = "a"\ntokens = ["x"]\n[[auth.tenants]]\nname = "a"\ntokens = ["y"]\n',
     "a second tenant of that name"),
    ('[[auth.tenants]]\nname = "a"\ntokens = ["x y"]\n', "holds white space"),
    ('[[auth.tenants]]\nname = "a"\ntokens = ["x"]\nmax_payloads_per_s = -1\n', "max_payloads_per_s: must be 0"),
    ('[[auth.tenants]]\nname = "a"\ntokens = ["x"]\nrate = 5\n', "[auth].tenants[0].rate: unknown key"),
    ('[auth]\ntenants = ["a"]\n', "[auth].tenants: expected"),
])
def test_bad_tenant_config_is_refused_naming_it(tmp_path: Path, text: str, expected: str) -> None:
    p, message = refused(tmp_path, text)
    assert str(p) in message and expected in message, message


# -- describe / reference_rows ------------------------------------------------------------------


def _table_values(config: Config) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for table, key in all_keys():
        value = getattr(getattr(config, table), key)
        out.setdefault(table, {})[key] = dict(value) if key == "parquet_columns" else value
    return out


def test_describe_reparses_to_the_same_config(tmp_path: Path) -> None:
    tf = tmp_path / "tokens"
    tf.write_text("from-file\n", encoding="utf-8")
    text = (
        '[http]\nlisten = "0.0.0.0:0"\nmax_body_bytes = 1234\nmax_decoded_bytes = 5678\n'
        '[sink]\nkind = "s3"\nbucket = "my-bucket"\nprefix = "a\\\\b\\"c"\nfsync = false\n'
        '[batch]\nformat = "parquet"\nparquet_columns = { device = "string", "seq no" = "int64" }\n'
        f'[auth]\ntokens = ["s3cr3t-one", "s3cr3t-two"]\ntokens_file = "{tf}"\n'
        '[[auth.tenants]]\nname = "acme"\ntokens = ["s3cr3t-acme"]\nmax_payloads_per_s = 50\n'
        "[shutdown]\ndrain_timeout_s = 2.5\n"
    )
    config = load(write(tmp_path, text))
    out = describe(config)
    parsed = tomllib.loads(out)
    values = _table_values(config)
    for table, keys in values.items():
        for key, value in keys.items():
            if (table, key) in (("auth", "tokens"), ("auth", "tenants")):
                continue
            assert parsed[table][key] == value, f"{table}.{key}"
    assert set(parsed) == set(values)
    assert all(set(parsed[t]) == set(values[t]) for t in values)
    assert len(parsed["auth"]["tokens"]) == 2
    assert parsed["auth"]["tenants"] == [{"name": "acme", "tokens": ["<redacted>"], "max_payloads_per_s": 50}]
    assert "s3cr3t" not in out
    assert str(tmp_path / "ingestd.toml") in out.splitlines()[0]


def test_describe_has_a_help_comment_on_every_key() -> None:
    lines = [ln for ln in describe(Config()).splitlines() if " = " in ln]
    assert len(lines) == len(all_keys())
    assert all("  # " in ln for ln in lines)


def test_describe_reparses_with_control_characters_in_strings(tmp_path: Path) -> None:
    # TOML accepts escapes, so a string value that loads must print back as valid TOML
    config = load(write(tmp_path, '[sink]\nprefix = "line1\\nline2\\u0001"\n'))
    assert config.sink.prefix == "line1\nline2\x01"
    parsed = tomllib.loads(describe(config))
    assert parsed["sink"]["prefix"] == "line1\nline2\x01"


def test_reference_rows_cover_every_field() -> None:
    rows = reference_rows()
    keys = [k for k, _, _ in rows]
    assert keys == reference_keys()
    hints = get_type_hints(Config)
    for key, default, help_text in rows:
        table, name = key.rsplit(".", 1)
        assert help_text.strip()
        cls = TenantConfig if table == "auth.tenants[]" else hints[table]
        expected = {f.name: f.default for f in dataclasses.fields(cls)}[name]
        parsed = tomllib.loads(f"v = {default}")["v"]
        if isinstance(expected, tuple):
            parsed = tuple(parsed)
        assert parsed == expected, key


# -- command line -------------------------------------------------------------------------------


def test_cli_check_config_prints_effective_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, '[http]\nlisten = "127.0.0.1:0"\n[batch]\nmax_payloads = 7\n')
    assert cli.main(["check-config", "--config", str(p)]) == 0
    out = capsys.readouterr().out
    parsed = tomllib.loads(out)
    assert parsed["batch"]["max_payloads"] == 7
    assert parsed["http"]["listen"] == "127.0.0.1:0"
    assert parsed["sink"]["kind"] == "directory"


def test_cli_config_before_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, "[workers]\ncount = 5\n")
    assert cli.main(["--config", str(p), "check-config"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["workers"]["count"] == 5


def test_cli_check_config_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, "[queue]\nmax_itemz = 3\n")
    assert cli.main(["check-config", "--config", str(p)]) == EXIT_CONFIG == 2
    captured = capsys.readouterr()
    assert "[queue].max_itemz" in captured.err
    assert str(p) in captured.err
    assert captured.out == ""


def test_cli_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml" in capsys.readouterr().err


def test_cli_check_config_without_file_uses_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no config.toml here
    assert cli.main(["check-config"]) == 0
    parsed = tomllib.loads(capsys.readouterr().out)
    assert parsed["sink"]["path"] == "./data/objects"
    assert parsed["http"]["listen"] == "127.0.0.1:8080"


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"ingestd {__version__}"
