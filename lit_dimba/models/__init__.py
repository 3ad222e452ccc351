"""Networks: embeddings, attention, and the one layout-driven backbone."""

from lit_dimba.models.backbone import Backbone, Mamba1Config, MambaConfig

__all__ = ["Backbone", "Mamba1Config", "MambaConfig"]
