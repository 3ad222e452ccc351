"""The synthetic worlds of the demo data and the prompt-following score. One object per image: its vocabulary
(``world.py``), drawing (``render.py``), wording (``captions.py``) and reading an image back (``reader.py``).
Several objects in GenEval's six task types: ``composition.py`` (what a prompt asks for), ``layout.py``,
``draw.py``, ``phrasing.py`` and ``detect.py``. The data side (``datamodules.synthetic``) and the evaluation
(``lit_dimba.eval``) both build on them."""

from lit_dimba.scenes.captions import caption
from lit_dimba.scenes.reader import read_scene
from lit_dimba.scenes.render import render
from lit_dimba.scenes.world import ATTRIBUTES, BACKGROUND, COLOURS, POSITIONS, SHAPES, SIZES, Scene, all_scenes

__all__ = ["ATTRIBUTES", "BACKGROUND", "COLOURS", "POSITIONS", "SHAPES", "SIZES", "Scene", "all_scenes", "caption",
           "read_scene", "render"]
