"""The shared caption-image DataModule and its sources."""

from datamodules.caption_image import CaptionImageDataModule
from datamodules.hf import HFDatasetSource, ImageFolderSource
from datamodules.synthetic import SyntheticShapesSource
from datamodules.webdataset import WebDatasetSource

__all__ = ["CaptionImageDataModule", "HFDatasetSource", "ImageFolderSource", "SyntheticShapesSource",
           "WebDatasetSource"]
