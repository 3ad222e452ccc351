"""Lightning callbacks of lit-dimba, listed in YAML under ``trainer.callbacks``."""

from callbacks.ema import EMA
from callbacks.image_writer import ImageWriter
from callbacks.pe_interpolation import PEInterpolation
from callbacks.prompt_following import PromptFollowing
from callbacks.resolution_curriculum import ResolutionCurriculum
from callbacks.sample_logger import SampleLogger
from callbacks.throughput import Throughput

__all__ = ["EMA", "ImageWriter", "PEInterpolation", "PromptFollowing", "ResolutionCurriculum", "SampleLogger",
           "Throughput"]
