"""Entry point of the concept world's spawned training processes.

It lives apart from :mod:`library.concept_world.model` and receives the config as a plain dict,
so a child process unpickles its arguments without importing diffusers, and can quiet
third-party import-time warnings before it does.
"""

from __future__ import annotations

from typing import Any


def distributed_entry(rank: int, world: int, config_fields: dict[str, Any], *rest: Any) -> None:
    """Rebuild the :class:`ModelConfig` and run one rank of the data-parallel training."""
    from library.quiet import quiet_third_party_output

    quiet_third_party_output()
    from library.concept_world.model import ModelConfig, _distributed_entry

    _distributed_entry(rank, world, ModelConfig(**config_fields), *rest)
