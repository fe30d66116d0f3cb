"""Where MemoirConfig settings come from: a YAML (or JSON) file, environment variables, arguments.

Precedence, highest first: an explicit argument, then an environment variable, then the file, then
the dataclass default. Every value passes MemoirConfig's own validation, so a bad value from any
source raises MemoirConfigError naming that source.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .config import MemoirConfig
from .errors import MemoirConfigError

ENVIRONMENT_VARIABLES = {
    "MEMOIR_TOP_K": "top_k",
    "MEMOIR_THRESHOLD": "threshold",
    "MEMOIR_LAYER": "layer",
    "MEMOIR_MAX_STEPS": "max_steps",
    "MEMOIR_LR": "learning_rate",
}


def load_config(path: str | os.PathLike | None = None, *, environ: Mapping[str, str] | None = None,
                **explicit: Any) -> MemoirConfig:
    """A MemoirConfig from ``path`` (YAML or JSON), overridden by MEMOIR_* variables, then by ``explicit``."""
    values = {}
    if path is not None:
        values.update(_checked(read_settings_file(path), source=str(path)))
    values.update(environment_settings(os.environ if environ is None else environ))
    values.update(explicit)
    return MemoirConfig.from_dict(values)


def _checked(values: dict[str, Any], *, source: str) -> dict[str, Any]:
    """``values`` if they make a valid MemoirConfig on their own; else the error, naming ``source``."""
    try:
        MemoirConfig.from_dict(values)
    except MemoirConfigError as error:
        raise MemoirConfigError(f"{source}: {error}") from None
    return values


class _SettingsLoader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-5 (an exponent without a dot) as text; settings files read it as the number, as YAML 1.2."""


_SettingsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_settings_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of settings in a YAML file (``.json`` files are read as JSON)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise MemoirConfigError(f"cannot read the settings file {path}: {error}") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_SettingsLoader)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise MemoirConfigError(f"{path} is not a valid {'JSON' if path.suffix == '.json' else 'YAML'} file: "
                                f"{error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise MemoirConfigError(f"{path} must hold a mapping of MemoirConfig settings (key: value), "
                                f"not a {type(values).__name__}.")
    return values


def environment_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from the MEMOIR_* variables that are set."""
    settings = {}
    for variable, name in ENVIRONMENT_VARIABLES.items():
        if variable in environ:
            settings.update(_checked({name: _parse(variable, name, environ[variable])}, source=variable))
    return settings


def _parse(variable: str, name: str, text: str) -> Any:
    text = text.strip()
    if not text:
        raise MemoirConfigError(f"{variable} is set but empty: unset it or give a value for {name}.")
    if name == "layer":
        return int(text) if _is_int(text) else text  # a module name is checked when the model is patched
    try:
        return int(text) if name == "max_steps" or (name == "top_k" and _is_int(text)) else float(text)
    except ValueError:
        kind = "an int" if name == "max_steps" else "a number"
        raise MemoirConfigError(f"{variable}={text!r} is not {kind} (it sets MemoirConfig.{name}).") from None


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit()
