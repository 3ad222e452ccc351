"""Networks: embeddings, attention, and the one layout-driven backbone."""

from lit_dimba.models.backbone import Backbone, MambaConfig

__all__ = ["Backbone", "MambaConfig"]
