"""Model sources ("parsers"): a registry maps ``model.kind`` to a :class:`BaseParser` subclass."""

from efficientbioai.models import bioimageio, onnx_file, pytorch  # noqa: F401  (register the built-in kinds)

# kind 'cellpose' (extra efficientbioai[cellpose]): cellpose itself is imported when such a model loads,
# and a missing cellpose is reported there with the install command.
from efficientbioai.models import cellpose  # noqa: F401,E402  isort: skip
from efficientbioai.models.base import (
    PARSERS,
    BaseParser,
    LoadedModel,
    get_parser,
    load_model,
    register_parser,
)

__all__ = ["PARSERS", "BaseParser", "LoadedModel", "get_parser", "load_model", "register_parser"]
