"""What the other sub-packages share: files (atomic writes, the journal, bounded reads, path checks), nested
tensors and calibration data, the model's state, distributed ranks, progress, wrapped models."""

import os

#: The folder of the acps_core package: frames from files below it are acps's own code.
ACPS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
