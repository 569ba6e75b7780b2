"""Reading config files and validating them, with errors that name the key and the fix."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from efficientbioai.config.compress import CompressConfig
from efficientbioai.errors import ConfigError


def _model_of(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as ``PruneConfig | None``."""
    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _format_errors(err: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = [f"{source}: {err.error_count()} problem(s) in the configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = model
            for part in e["loc"][:-1]:
                field = parent.model_fields.get(str(part)) if isinstance(parent, type) else None
                parent = _model_of(field.annotation) if field is not None else None
            known = (
                list(parent.model_fields)
                if isinstance(parent, type) and issubclass(parent, BaseModel)
                else []
            )
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
            lines.append(f"  - {loc}: unknown key; {hint}")
        elif e["type"] == "missing":
            lines.append(f"  - {loc}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(
                f"  - {loc}: {msg} (got {e.get('input')!r})"
                if e["type"] != "value_error"
                else f"  - {loc}: {msg}"
            )
    return "\n".join(lines)


def read_config_file(path: Path, overrides: dict | None = None, examples: str = "configs/") -> dict:
    """A YAML config file as a mapping, with the non-None ``overrides`` (command-line options) applied."""
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder, not a config file", "give the YAML file itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", "check the path given to --config")
    try:
        raw = path.read_bytes()
        if b"\0" in raw[:8192]:
            raise UnicodeDecodeError("utf-8", raw[:1], 0, 1, "a NUL byte")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not a text file (it holds binary data: {exc.reason}), so it cannot be a YAML config",
            f"give the YAML config file (see {examples} for examples), not an image or a model",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{path} cannot be read ({type(exc).__name__}: {exc})", "check the file's permissions"
        ) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path} is not valid YAML: {exc}", "fix the indentation / syntax at that line"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of keys to values", f"see {examples} for examples")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return data


def load_config(path: str | Path, model: type[BaseModel] = CompressConfig, overrides: dict | None = None):
    """Read and validate a YAML config; every problem is reported with its key path."""
    path = Path(path)
    return validate_config(read_config_file(path, overrides), model, source=str(path))


def validate_config(data: dict, model: type[BaseModel] = CompressConfig, source: str = "config"):
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            _format_errors(err, model, source),
            "edit the config; `efficientbioai schema` prints every key with its description",
        ) from None
