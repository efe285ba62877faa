"""What every concept-world study tool does first: offline, quiet, one torch thread, the cached model."""

from __future__ import annotations

import os
from pathlib import Path


def concept_study_model() -> Path:
    """Set up a measurement process (no hub access, third-party chatter off, warnings only, one torch
    thread so that runs compare on a shared machine) and return the concept-world model folder
    (built on first use)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    import torch

    from library.quiet import quiet_third_party_output

    quiet_third_party_output()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    from library.concept_world.model import ensure_concept_model

    return ensure_concept_model()
