"""The shared caption-image DataModule and its sources."""

from datamodules.caption_image import CaptionImageDataModule
from datamodules.synthetic import SyntheticShapesSource

__all__ = ["CaptionImageDataModule", "SyntheticShapesSource"]
