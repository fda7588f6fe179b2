"""The one place the components' container image is chosen.

Every component runs in the project's image (``components/Dockerfile``), never kfp's default
``python`` image: the components import :mod:`rima_core` and its pinned dependencies, and kfp's
default image changes between releases. ``RIMA_IMAGE`` overrides the default for a whole
compile; ``python -m pipelines compile --image`` overrides both.
"""

from __future__ import annotations

import os

import rima_core

IMAGE_ENV = "RIMA_IMAGE"
# The tag follows the package version, so an image and the source compiled against it match.
DEFAULT_IMAGE = f"ghcr.io/rima-ophtho/rima:{rima_core.__version__}"


def rima_image(image: str | None = None) -> str:
    """``image`` if given, else ``$RIMA_IMAGE``, else :data:`DEFAULT_IMAGE`."""
    chosen = image or os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE
    if chosen.split("/")[-1].count(":") == 0 and "@" not in chosen:
        raise ValueError(f"image {chosen!r} has no tag or digest: pin it (e.g. {DEFAULT_IMAGE})")
    return chosen
