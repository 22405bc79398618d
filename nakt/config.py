"""Options dataclasses from YAML configs and keyword arguments (CLI flags and YAML keys share names)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypeVar

from nakt.errors import NaktError

__all__ = ["make_options"]

T = TypeVar("T")


def make_options(cls: type[T], config: str | Path | None = None, **given) -> T:
    """Build `cls` from a YAML file's keys, overridden by `given` values that are not None.

    Unknown keys are an error naming the file and the valid keys.
    """
    import yaml

    valid = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise NaktError(path, "config file not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise NaktError(path, f"invalid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise NaktError(path, "a config is a mapping of option: value")
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise NaktError(path, f"unknown key {unknown[0]!r}", f"valid: {', '.join(sorted(valid))}")
    unknown = sorted(set(given) - valid)
    if unknown:
        raise TypeError(f"{cls.__name__} has no option {unknown[0]!r}")
    values.update({k: v for k, v in given.items() if v is not None})
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in values]
    if missing:
        raise NaktError(config, f"missing option {missing[0]!r}", f"give --{missing[0].replace('_', '-')}")
    return cls(**values)
