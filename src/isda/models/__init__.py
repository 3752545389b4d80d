"""The paper's components, one per file, and the assembled model (:mod:`isda.models.isda`)."""

from .isda import ISDA, build_model

__all__ = ["ISDA", "build_model"]
