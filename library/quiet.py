"""Keep third-party chatter out of what users read (training logs, the demo, the evaluator).

Call :func:`quiet_third_party_output` at the start of an entry point, before diffusers' models
or pipelines are imported: bitsandbytes warns about optional CPU kernels when it is imported, and
transformers about torchvision, neither of which concerns LECO.
"""

from __future__ import annotations

import logging
import warnings


def quiet_import_warnings() -> None:
    """The cheap part, safe before argument checks: it imports nothing."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def quiet_third_party_output() -> None:
    """Errors only from bitsandbytes, transformers and diffusers; no weight-loading progress bars."""
    quiet_import_warnings()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
