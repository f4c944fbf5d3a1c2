"""The array types that cross the protocol: uint8 frames in, float32 logits out (numpy only)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Frames = npt.NDArray[np.uint8]
Logits = npt.NDArray[np.float32]
