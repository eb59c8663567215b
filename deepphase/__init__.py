"""deepphase: phase images from 4D-STEM data with a convolutional network (PRL 130, 016101).

Data flow: physics → data → models → training / reconstruction → evaluation, with a thin CLI on top.
"""

__version__ = "0.1.0"

from .errors import DeepPhaseError  # noqa: E402

__all__ = ["DeepPhaseError", "__version__"]
