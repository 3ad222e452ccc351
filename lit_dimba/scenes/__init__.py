"""The synthetic world of the demo data and the prompt-following score: its vocabulary (``world.py``), drawing
(``render.py``), wording (``captions.py``) and reading an image back (``reader.py``). The data side
(``datamodules.synthetic``) and the evaluation (``lit_dimba.eval``) both build on it."""

from lit_dimba.scenes.captions import caption
from lit_dimba.scenes.reader import read_scene
from lit_dimba.scenes.render import render
from lit_dimba.scenes.world import ATTRIBUTES, BACKGROUND, COLOURS, POSITIONS, SHAPES, SIZES, Scene, all_scenes

__all__ = ["ATTRIBUTES", "BACKGROUND", "COLOURS", "POSITIONS", "SHAPES", "SIZES", "Scene", "all_scenes", "caption",
           "read_scene", "render"]
