"""Where the model that ships with the package lives."""

from __future__ import annotations

import os

DEFAULT_MODEL_SUBDIR = "default"


def default_model_dir() -> str:
    """The shipped default model's directory (used when no model is named)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), DEFAULT_MODEL_SUBDIR)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"no model was named and no default model is installed at {path}; "
                         f"pass an HF model directory")
    return path
