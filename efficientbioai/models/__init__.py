"""Model sources ("parsers"): a registry maps ``model.kind`` to a :class:`BaseParser` subclass."""

from efficientbioai.models import bioimageio, onnx_file, pytorch  # noqa: F401  (register the built-in kinds)
from efficientbioai.models.base import (
    PARSERS,
    BaseParser,
    LoadedModel,
    get_parser,
    load_model,
    register_parser,
)

__all__ = ["PARSERS", "BaseParser", "LoadedModel", "get_parser", "load_model", "register_parser"]
