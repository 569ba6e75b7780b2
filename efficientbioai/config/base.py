"""What every config section shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

AXES_HELP = "input axes of the network, 'bcyx' for 2D or 'bczyx' for 3D"


class StrictConfig(BaseModel):
    """A config section: unknown keys are errors, attribute docstrings are the documentation."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
