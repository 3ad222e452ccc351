"""Networks: embeddings, attention, and the one layout-driven backbone."""

from lit_dimba.models.backbone import PRESETS, Backbone

__all__ = ["PRESETS", "Backbone"]
