"""efficientbioai: compress bioimage deep-learning models into fast inference engines.

The public entry points are :func:`efficientbioai.compress.compress` (what ``efficientbioai compress``
runs), the model parsers in :mod:`efficientbioai.models` (``BaseParser`` is the extension point) and
the engines in :mod:`efficientbioai.engines`.
"""

__version__ = "0.1.0"
