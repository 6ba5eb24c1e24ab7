"""gateway.yaml loading: one fixture per failure mode with its exact messages, interpolation, the example."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml

from gateway.config import ConfigError, GatewayConfig, RouteConfig, load_config
from gateway.config.common import Strict
from gateway.config.routes import CorsConfig
from gateway.config.schema import KeysConfig, LimitsConfig

FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "gateway.example.yaml"


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Problems name the file as given: tests load `gateway.yaml` from their own directory."""
    monkeypatch.chdir(tmp_path)


def allowed(model: type[Strict]) -> str:
    return ", ".join(model.model_fields)


ROUTE = allowed(RouteConfig)
TOP = allowed(GatewayConfig)

# fixture file -> the exact problem lines, in order
CASES: dict[str, list[str]] = {
    "unknown_top_level_key.yaml": [
        f"unknown_top_level_key.yaml:2: listen_port: unknown field (allowed: {TOP})",
    ],
    "unknown_nested_key.yaml": [
        f"unknown_nested_key.yaml:3: limits.body_timout: unknown field (allowed: {allowed(LimitsConfig)})",
    ],
    "unknown_route_key.yaml": [
        f"unknown_route_key.yaml:5: routes.0.retries: unknown field (allowed: {ROUTE})",
    ],
    "wrong_type_string.yaml": ["wrong_type_string.yaml:2: admin.token: expected a string"],
    "wrong_type_int.yaml": ["wrong_type_int.yaml:1: upstream_keepalive: expected an integer"],
    "wrong_type_bool.yaml": ["wrong_type_bool.yaml:5: routes.0.websocket: expected a boolean"],
    "wrong_type_list.yaml": ["wrong_type_list.yaml:1: trusted_proxies: expected a list"],
    "wrong_type_mapping.yaml": ["wrong_type_mapping.yaml:1: limits: expected a mapping"],
    "wrong_type_null.yaml": [
        "wrong_type_null.yaml:1: store: expected a string",
        "wrong_type_null.yaml:2: admin: expected a mapping",
    ],
    "upstream_wrong_type.yaml": [
        "upstream_wrong_type.yaml:4: routes.0.upstream: expected a string or a list of strings",
    ],
    "scopes_wrong_type.yaml": [
        "scopes_wrong_type.yaml:5: routes.0.scopes: expected a mapping or a list of strings",
    ],
    "bad_duration.yaml": [
        "bad_duration.yaml:2: shutdown_timeout: expected a duration such as 30s, 15m, 24h or 90d",
        "bad_duration.yaml:4: limits.idle_timeout: '75 seconds' is not a duration (use e.g. 500ms, 30s, 15m, 24h, 90d)",
    ],
    "bad_size.yaml": [
        "bad_size.yaml:2: limits.max_header_bytes: '32 kilobytes' is not a size (use e.g. 65536, 512KiB, 10MiB, 1GiB)",
    ],
    "bad_rate.yaml": [
        "bad_rate.yaml:5: routes.0.ratelimit: '100/min' is not a rate (use N/second, N/minute, N/hour, N/day or N/month)",
    ],
    "bad_listen.yaml": [
        "bad_listen.yaml:1: listen: '0.0.0.0' is not HOST:PORT",
        "bad_listen.yaml:3: admin.listen: port 80810 is out of range",
    ],
    "bad_cidr.yaml": ["bad_cidr.yaml:3: trusted_proxies.1: '192.168.1.300/24' is not an IP address or CIDR"],
    "upstream_bad_scheme.yaml": [
        "upstream_bad_scheme.yaml:4: routes.0.upstream: 'ftp://files.internal' is not an http:// or https:// URL",
    ],
    "upstream_with_query.yaml": [
        "upstream_with_query.yaml:4: routes.0.upstream: 'http://files-2.internal/?token=abc': an upstream URL"
        " takes no query or fragment",
    ],
    "route_path_no_slash.yaml": ["route_path_no_slash.yaml:3: routes.0.path: must start with '/'"],
    "route_path_not_canonical.yaml": [
        "route_path_not_canonical.yaml:3: routes.0.path: is not in canonical form (write '/api/orders/list')",
    ],
    "lowercase_method.yaml": ["lowercase_method.yaml:4: routes.0.methods: 'post' is not an uppercase HTTP method"],
    # a union field (upstream: str | list, scopes: mapping | list) is checked as the kind it looks like
    "union_members.yaml": [
        "union_members.yaml:4: routes.0.upstream.1: expected a string",
        "union_members.yaml:6: routes.0.scopes.GET: expected a list",
        "union_members.yaml:7: routes.0.scopes.POST.1: expected a string",
    ],
    # each value ends in a line break, which a `^...$` match let through (and on to a header upstream)
    "line_breaks.yaml": [
        "line_breaks.yaml:2: keys.headers: 'X-API-Key\\n' is not a header name",
        "line_breaks.yaml:7: routes.0.methods: 'GET\\n' is not an uppercase HTTP method",
        "line_breaks.yaml:8: routes.0.scopes: 'orders:read\\n' is not a scope (like orders:read, orders:* or *)",
    ],
    "bad_scope.yaml": [
        "bad_scope.yaml:5: routes.0.scopes: 'Orders:Write' is not a scope (like orders:read, orders:* or *)",
    ],
    "bad_auth.yaml": ["bad_auth.yaml:5: routes.0.auth: must be one of: required, optional, none"],
    "nested_literal.yaml": [
        "nested_literal.yaml:3: keys.query.policy: must be one of: reject, warn",
        "nested_literal.yaml:4: headers_with_underscores: must be one of: drop, reject, allow",
    ],
    "out_of_range.yaml": [
        "out_of_range.yaml:2: limits.max_headers: must be at most 10000",
        "out_of_range.yaml:4: ratelimit.replicas: must be at least 1",
    ],
    "duplicate_route_names.yaml": ["duplicate_route_names.yaml:1: routes: two routes are named 'orders'"],
    "duplicate_yaml_key.yaml": ["duplicate_yaml_key.yaml:3: (root): duplicate key 'listen'"],
    "yaml_syntax_error.yaml": [
        "yaml_syntax_error.yaml:4: (root): expected <block end>, but found '<block mapping start>'"
        " (while parsing a block collection at line 2)",
    ],
    "two_documents.yaml": [
        "two_documents.yaml:2: (root): but found another document (expected a single document in the stream at line 1)",
    ],
    "root_not_mapping.yaml": ["root_not_mapping.yaml:1: (root): expected a mapping"],
    "unset_env_var.yaml": [
        "unset_env_var.yaml:1: store: environment variable DB_PASSWORD is not set",
        "unset_env_var.yaml:3: keys.pepper: environment variable GATEWAY_KEY_PEPPER is not set",
    ],
    "bad_reference.yaml": [
        "bad_reference.yaml:2: admin.token: bad reference '${ADMIN TOKEN}'"
        " (use ${VAR} or ${VAR:-default}; $${ for a literal ${)",
    ],
    "cors_credentials_wildcard.yaml": [
        'cors_credentials_wildcard.yaml:5: routes.0.cors: credentials: true cannot be combined with origin "*"'
        " (browsers refuse it)",
    ],
    "missing_upstream.yaml": ["missing_upstream.yaml:2: routes.0.upstream: required field is missing"],
    "missing_nested_field.yaml": [
        "missing_nested_field.yaml:1: tls.key: required field is missing",
        "missing_nested_field.yaml:5: keys.old_peppers.0.secret: required field is missing",
    ],
    "bad_keys_prefix.yaml": [
        "bad_keys_prefix.yaml:2: keys.prefix: must be 1-16 lowercase letters or digits, starting with a letter",
    ],
    "bad_ratelimit_backend.yaml": [
        "bad_ratelimit_backend.yaml:2: ratelimit.backend: must be memory://, redis://HOST:PORT/DB or rediss://…",
    ],
    "bad_store.yaml": ["bad_store.yaml:1: store: must be sqlite:///FILE or postgresql://USER:PASS@HOST:PORT/DB"],
    "anchors_and_aliases.yaml": [
        "anchors_and_aliases.yaml:2: routes.0: YAML anchors (&orders) are not supported",
        "anchors_and_aliases.yaml:6: routes.1: YAML aliases (*orders) are not supported",
    ],
    # the refused merge would have brought `upstream`: its absence is not reported as well
    "merge_key.yaml": ["merge_key.yaml:5: routes.1: YAML merge keys ('<<') are not supported"],
    "non_string_key.yaml": [
        "non_string_key.yaml:3: limits: mapping key '8080' is not a string (quote it)",
        "non_string_key.yaml:9: routes.0.scopes: mapping keys must be strings",
    ],
    "unsupported_tag.yaml": [
        "unsupported_tag.yaml:1: store: unsupported YAML tag '!env'",
        "unsupported_tag.yaml:3: keys.pepper: unsupported YAML tag '!!binary'",
        "unsupported_tag.yaml:4: trusted_proxies: unsupported YAML tag '!!set'",
    ],
    # every problem, in line order (pydantic reports fields in schema order: listen, limits, routes)
    "several_errors.yaml": [
        "several_errors.yaml:3: routes.0.path: must start with '/'",
        "several_errors.yaml:5: routes.0.websocket: expected a boolean",
        "several_errors.yaml:6: routes.1.path: required field is missing",
        "several_errors.yaml:9: limits.max_headers: must be at least 1",
        "several_errors.yaml:10: limits.header_timeout: environment variable HEADER_TIMEOUT is not set",
        "several_errors.yaml:11: limits: duplicate key 'header_timeout'",
        "several_errors.yaml:12: listen: expected HOST:PORT",
        f"several_errors.yaml:13: colour: unknown field (allowed: {TOP})",
    ],
}


def test_every_fixture_has_a_case() -> None:
    assert sorted(p.name for p in FIXTURES.glob("*.yaml")) == sorted(CASES)


@pytest.mark.parametrize("fixture", sorted(CASES))
def test_fixture_errors(fixture: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(FIXTURES)
    with pytest.raises(ConfigError) as info:
        load_config(fixture, env={})
    assert info.value.errors == CASES[fixture]
    assert str(info.value) == "\n".join(CASES[fixture])


# --- files that cannot be read ------------------------------------------------------------------


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("nowhere.yaml", env={})
    assert info.value.errors == ["nowhere.yaml:0: (root): cannot read file (No such file or directory)"]


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    with pytest.raises(ConfigError) as info:
        load_config("conf.d", env={})
    assert info.value.errors == ["conf.d:0: (root): cannot read file (Is a directory)"]


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_bytes(b"listen: ':8080'\nadmin:\n  token: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config("gateway.yaml", env={})
    assert info.value.errors == ["gateway.yaml:3: (root): not UTF-8 text (byte 0xe9)"]


def test_control_character(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text("listen: ':8080'\nstore: a\x07b\n")
    with pytest.raises(ConfigError) as info:
        load_config("gateway.yaml", env={})
    assert info.value.errors == [
        "gateway.yaml:2: (root): unacceptable character #x0007: special characters are not allowed"
    ]


def test_file_name_as_given(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("listen: 8080\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})  # a PathLike works too
    assert info.value.errors == [f"{path}:1: listen: expected HOST:PORT"]


# --- valid files --------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, env: dict[str, str]) -> GatewayConfig:
    write(tmp_path, text)
    return load_config("gateway.yaml", env=env)


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing set\n", "---\n", "~\n", "null\n", "{}\n"])
def test_empty_file_means_defaults(tmp_path: Path, text: str) -> None:
    assert load_config(write(tmp_path, text), env={}) == GatewayConfig()


def test_defaults() -> None:
    cfg = GatewayConfig()
    assert cfg.listen == ("0.0.0.0", 8080)
    assert cfg.admin.listen == ("127.0.0.1", 8081)
    assert cfg.store == "sqlite:///gateway.db"
    assert cfg.routes == []


def test_values_are_parsed(tmp_path: Path) -> None:
    text = """\
listen: "[::1]:9000"
trusted_proxies: [10.0.0.0/8, "::ffff:192.168.0.1"]
limits: {header_timeout: 250ms, max_header_bytes: 64KiB}
keys: {default_ttl: none}
routes:
  - {name: a, path: /a/, upstream: "https://a.internal:8443/base", scopes: ["a:read"]}
"""
    cfg = load_text(tmp_path, text, {})
    assert cfg.listen == ("::1", 9000)
    assert cfg.trusted_proxies == [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.0.1/32")]
    assert cfg.limits.header_timeout == 0.25
    assert cfg.limits.max_header_bytes == 65536
    assert cfg.keys.default_ttl is None
    assert cfg.routes[0].path == "/a"
    assert cfg.routes[0].scopes == ["a:read"]


# --- ${VAR} interpolation -----------------------------------------------------------------------


def test_variable_and_default(tmp_path: Path) -> None:
    text = 'listen: "${HOST:-127.0.0.1}:${PORT:-9000}"\nstore: "${STORE}"\n'
    cfg = load_text(tmp_path, text, {"STORE": "postgresql://gw@db/gw"})
    assert cfg.listen == ("127.0.0.1", 9000)
    assert cfg.store == "postgresql://gw@db/gw"
    cfg = load_text(tmp_path, text, {"HOST": "10.1.2.3", "PORT": "7000", "STORE": "sqlite:///x.db"})
    assert cfg.listen == ("10.1.2.3", 7000)


def test_empty_default(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "admin:\n  token: ${TOKEN:-}\nkeys:\n  pepper: '${PEPPER:-}'\n", {})
    assert cfg.admin.token == ""
    assert cfg.keys.pepper == ""


def test_set_but_empty(tmp_path: Path) -> None:
    # like the shell: an empty variable is taken as is, or replaced by a default when one is given
    cfg = load_text(tmp_path, 'admin: {token: "${TOKEN}"}\nkeys: {prefix: "${PREFIX:-pk}"}\n', {"TOKEN": "", "PREFIX": ""})
    assert cfg.admin.token == ""
    assert cfg.keys.prefix == "pk"


def test_plain_scalar_is_typed(tmp_path: Path) -> None:
    text = """\
upstream_keepalive: ${KEEPALIVE:-16}
limits:
  max_headers: ${A}${B}
routes:
  - name: ws
    path: /ws
    upstream: http://ws.internal
    websocket: ${WEBSOCKET}
    upstream_ca: ${CA:-null}
"""
    cfg = load_text(tmp_path, text, {"WEBSOCKET": "true", "A": "1", "B": "20"})
    assert cfg.upstream_keepalive == 16
    assert cfg.limits.max_headers == 120
    assert cfg.routes[0].websocket is True
    assert cfg.routes[0].upstream_ca is None


def test_quoted_scalar_stays_a_string(tmp_path: Path) -> None:
    text = "admin:\n  token: \"${TOKEN}\"\nkeys:\n  pepper: '${PEPPER}'\n  prefix: !!str ${PREFIX}\n"
    cfg = load_text(tmp_path, text, {"TOKEN": "12345", "PEPPER": "true", "PREFIX": "null"})
    assert cfg.admin.token == "12345"
    assert cfg.keys.pepper == "true"
    assert cfg.keys.prefix == "null"
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, 'upstream_keepalive: "${KEEPALIVE:-16}"\nadmin:\n  token: ${TOKEN}\n', {"TOKEN": "12345"})
    assert info.value.errors == [
        "gateway.yaml:1: upstream_keepalive: expected an integer",
        "gateway.yaml:3: admin.token: expected a string",  # plain: 12345 became a number
    ]


def test_typing_only_when_made_of_references(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "admin:\n  token: x${N}\nkeys:\n  pepper: ${N}x\n", {"N": "42"})
    assert (cfg.admin.token, cfg.keys.pepper) == ("x42", "42x")
    cfg = load_text(tmp_path, "keys:\n  pepper: ${N}\n", {"N": "42.5.1"})
    assert cfg.keys.pepper == "42.5.1"


def test_typed_results_are_scalars_only(tmp_path: Path) -> None:
    # text that YAML would read as a list, a mapping, a date, a tag or an alias stays the text itself
    for value in ("[1, 2]", "{a: 1}", "2024-01-01", "!!python/object:os.system", "*alias", "- item", "<<"):
        cfg = load_text(tmp_path, "admin:\n  token: ${TOKEN}\n", {"TOKEN": value})
        assert cfg.admin.token == value


def test_escape(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, 'admin:\n  token: "$${TOKEN} and $$ and $x"\nkeys:\n  pepper: $${P}\n', {"P": "1"})
    assert cfg.admin.token == "${TOKEN} and $$ and $x"
    assert cfg.keys.pepper == "${P}"


def test_references_in_flow_collections_are_quoted(tmp_path: Path) -> None:
    # `{` and `}` end a plain scalar inside [...] and {...}: there a reference must be quoted
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "admin: {token: ${TOKEN}}\n", {"TOKEN": "x"})
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith("gateway.yaml:1: (root): ")
    assert load_text(tmp_path, "admin: {token: '${TOKEN}'}\n", {"TOKEN": "x"}).admin.token == "x"


def test_several_variables_in_one_string(tmp_path: Path) -> None:
    text = 'store: "postgresql://${USER}:${PASS}@${HOST:-db}:${PORT:-5432}/${DB:-gateway}"\n'
    cfg = load_text(tmp_path, text, {"USER": "gw", "PASS": "s3cr3t", "DB": "keys"})
    assert cfg.store == "postgresql://gw:s3cr3t@db:5432/keys"


def test_several_unset_variables_in_one_string(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "listen: ':8080'\nstore: 'postgresql://${USER}:${PASS}@db/gw'\n", {})
    assert info.value.errors == [
        "gateway.yaml:2: store: environment variable USER is not set",
        "gateway.yaml:2: store: environment variable PASS is not set",
    ]


def test_no_yaml_injection(tmp_path: Path) -> None:
    env = {"TOKEN": "a\nb: c", "PEPPER": "x\nlisten: 1.2.3.4:1"}
    cfg = load_text(tmp_path, "admin:\n  token: ${TOKEN}\nkeys:\n  pepper: \"${PEPPER}\"\n", env)
    assert cfg.admin.token == "a\nb: c"
    assert cfg.keys.pepper == "x\nlisten: 1.2.3.4:1"
    assert cfg.listen == ("0.0.0.0", 8080)


def test_variables_in_lists_and_routes(tmp_path: Path) -> None:
    text = "trusted_proxies:\n  - ${LB}\nroutes:\n  - {name: a, path: /a, upstream: ['${UP1}', \"${UP2}\"]}\n"
    cfg = load_text(tmp_path, text, {"LB": "10.0.0.0/8", "UP1": "http://a1", "UP2": "http://a2"})
    assert cfg.trusted_proxies == [ipaddress.ip_network("10.0.0.0/8")]
    assert cfg.routes[0].upstream == ["http://a1", "http://a2"]


def test_keys_are_not_interpolated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "${KEY}: 1\n", {"KEY": "listen"})
    assert info.value.errors == [f"gateway.yaml:1: ${{KEY}}: unknown field (allowed: {TOP})"]


def test_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TEST_TOKEN", "from-environ")
    assert load_config(write(tmp_path, "admin: {token: '${GATEWAY_TEST_TOKEN}'}\n")).admin.token == "from-environ"


# --- config/gateway.example.yaml ----------------------------------------------------------------


def test_example_loads_and_is_the_defaults() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.model_copy(update={"routes": []}).model_dump() == GatewayConfig().model_dump()
    assert len(cfg.routes) == 1


def test_example_reads_secrets_from_the_environment() -> None:
    cfg = load_config(EXAMPLE, env={"GATEWAY_ADMIN_TOKEN": "t0ken", "GATEWAY_KEY_PEPPER": "pepper"})
    assert (cfg.admin.token, cfg.keys.pepper) == ("t0ken", "pepper")


def _route_lines() -> dict[str, int]:
    root = yaml.compose(EXAMPLE.read_text(), Loader=yaml.SafeLoader)
    routes = next(v for k, v in root.value if k.value == "routes")
    return {k.value: k.start_mark.line for k, _ in routes.value[0].value}


def test_example_route_marks_what_is_not_the_default() -> None:
    route = load_config(EXAMPLE, env={}).routes[0]
    defaults = RouteConfig(name=route.name, path=route.path, upstream=route.upstream)
    changed = {f for f in RouteConfig.model_fields if getattr(route, f) != getattr(defaults, f)}
    assert changed == {"methods", "host", "scopes", "ratelimit", "cors"}
    assert route.cors is not None
    assert route.cors.model_dump(exclude={"origins"}) == CorsConfig(origins=[]).model_dump(exclude={"origins"})
    # the comment above each option says "(default: ...)" exactly where the example differs from it
    text = EXAMPLE.read_text().splitlines()
    lines = _route_lines()
    assert set(lines) == set(RouteConfig.model_fields)
    for field, line in lines.items():
        comment = []
        i = line - 1
        while i >= 0 and text[i].strip().removeprefix("- ").startswith("#"):
            comment.append(text[i])
            i -= 1
        assert ("(default:" in "".join(comment)) == (field in changed), field


def _field_names(model: type[Strict], seen: set[str]) -> None:
    for name, info in model.model_fields.items():
        seen.add(name)
        for tp in [info.annotation, *getattr(info.annotation, "__args__", ())]:
            for inner in [tp, *getattr(tp, "__args__", ())]:
                if isinstance(inner, type) and issubclass(inner, Strict):
                    _field_names(inner, seen)


def test_example_names_every_option() -> None:
    names: set[str] = set()
    _field_names(GatewayConfig, names)
    text = EXAMPLE.read_text()
    missing = sorted(n for n in names if f"{n}:" not in text)
    assert missing == []
    assert KeysConfig.model_fields.keys() <= names
