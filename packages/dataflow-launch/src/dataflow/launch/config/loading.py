"""Loading a LaunchConfig from YAML with ``--set a.b=value`` overrides; dump and fingerprint.

Validation goes through JSON in pydantic's strict mode, so YAML's ``"1"`` is not an int and
``yes`` is not silently a string where a bool is wanted; every refusal becomes one
:class:`InvalidInputError` naming each offending field by its dotted path.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dataflow.contracts import InvalidInputError
from dataflow.launch.config.schema import LaunchConfig

REDACTED = "<redacted>"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``5e-4`` as a float (YAML 1.2), as users write learning rates."""


_Loader.yaml_implicit_resolvers = {
    key: list(value) for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


_SECRET_PATHS = (("store", "options", "token"),)
# Where and how a run executes, not what it computes: left out of the fingerprint, so a run can
# resume with another topology, store, ledger, device or data-parallel size (the ledger re-cuts
# windows for a new dp_size) and still be recognised as the same run.
PLACEMENT_PATHS: tuple[tuple[str, ...], ...] = (
    ("run", "out_dir"),
    ("run", "topology"),
    ("run", "deployment_mode"),
    ("store",),
    ("ledger",),
    ("flow",),
    ("producer",),
    ("target", "device"),
    ("target", "server_url"),
    ("target", "aux_server_url"),
    ("target", "request_timeout_s"),
    ("trainer", "dp_size"),
    ("trainer", "sp_size"),
    ("trainer", "checkpoint_every"),
    ("trainer", "keep_last"),
    ("trainer", "log_every"),
    ("trainer", "max_steps"),
    ("trainer", "on_nonfinite"),
    ("trainer", "max_bad_samples"),
)


def _json_value(value: Any) -> Any:
    raise InvalidInputError(
        f"config value {value!r} of type {type(value).__name__} is not a plain YAML scalar, "
        "list or mapping"
    )


def _describe(error: Mapping[str, Any]) -> str:
    path = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    message = str(error["msg"]).removeprefix("Value error, ")
    if not path:
        return message
    if kind == "value_error" and isinstance(error.get("input"), dict):
        # A rule across a section's fields: its message starts with the field it blames.
        field, sep, rest = message.partition(": ")
        if sep and field.isidentifier():
            return f"{path}.{field}: {rest}"
        return f"{path}: {message}"
    if kind in ("missing",):
        return f"{path}: {message.lower()}"
    return f"{path}: {message} (got {error.get('input')!r})"


def config_from_mapping(data: Mapping[str, Any]) -> LaunchConfig:
    """Validate a plain mapping (as parsed from YAML) into a LaunchConfig.

    Raises :class:`InvalidInputError` listing every bad field by dotted path.
    """
    if not isinstance(data, Mapping):
        raise InvalidInputError(f"a config must be a mapping, got {type(data).__name__}")
    text = json.dumps(data, default=_json_value)
    try:
        return LaunchConfig.model_validate_json(text)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors()]
        raise InvalidInputError("invalid config: " + "; ".join(problems)) from None


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """Split ``a.b=value`` into its key path and its value parsed as a YAML scalar."""
    key, sep, raw = item.partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not all(parts):
        raise InvalidInputError(f"override {item!r} must look like section.key=value")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``a.b=value`` override set; ``data`` is not modified."""
    out: dict[str, Any] = json.loads(json.dumps(data, default=_json_value))
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise InvalidInputError(
                    f"override {item!r}: {where} is a value ({child!r}), not a section"
                )
            node = child
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML config file into a mapping (an empty file is an empty mapping)."""
    file = Path(path)
    if not file.is_file():
        raise InvalidInputError(f"config file {str(file)!r} does not exist")
    try:
        data = _yaml(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"config file {str(file)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInputError(
            f"config file {str(file)!r} must hold a mapping at the top, got {type(data).__name__}"
        )
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> LaunchConfig:
    """Load ``path`` (or the defaults when None), apply ``overrides``, validate."""
    data = read_yaml(path) if path is not None else {}
    return config_from_mapping(apply_overrides(data, overrides))


def _strip(data: dict[str, Any], paths: Sequence[tuple[str, ...]], replacement: Any) -> None:
    for path in paths:
        node = data
        for part in path[:-1]:
            node = node[part]
        if path[-1] in node and (replacement is None or node[path[-1]] is not None):
            if replacement is None:
                del node[path[-1]]
            else:
                node[path[-1]] = replacement


def config_to_dict(config: LaunchConfig, *, redact: bool = True) -> dict[str, Any]:
    """The resolved config as plain data (secrets replaced by a marker unless ``redact=False``)."""
    data = config.model_dump(mode="json")
    if redact:
        _strip(data, _SECRET_PATHS, REDACTED)
    return data


def dump_yaml(config: LaunchConfig, *, redact: bool = True) -> str:
    """The resolved config as YAML; loading it back (unredacted) yields an equal config."""
    return str(yaml.safe_dump(config_to_dict(config, redact=redact), sort_keys=False))


def fingerprint(config: LaunchConfig) -> str:
    """A stable SHA-256 hex digest of what the run computes: its id and seed, the target, the
    data, staleness and the training hyper-parameters.

    Equal fingerprints mean the same samples trained the same way. Independent of key order and
    of every field in :data:`PLACEMENT_PATHS` (topology, store, ledger, flow control, producer,
    device, data-parallel size, checkpoint cadence); any other change alters it. The producer's
    regeneration settings are the exception within ``producer``: with ``producer.regenerate``
    on, the target writes the responses, so ``max_new_tokens`` and ``temperature`` change the
    samples and are part of the digest (off, they change nothing and are left out).
    """
    data = config.model_dump(mode="json")
    _strip(data, PLACEMENT_PATHS, None)
    producer = config.producer
    if producer.regenerate:
        data["regeneration"] = {
            "max_new_tokens": producer.max_new_tokens,
            "temperature": producer.temperature,
        }
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
