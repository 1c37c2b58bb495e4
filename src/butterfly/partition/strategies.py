"""Placement strategies over half-open `[start, end)` layer ranges."""

from __future__ import annotations

from butterfly.types.errors import InvalidConfiguration
from butterfly.types.model import LayerRange


def uniform_ranges(num_layers: int, num_stages: int) -> list[LayerRange]:
    """Split `num_layers` into `num_stages` contiguous ranges whose sizes differ by at most 1.

    Earlier stages get the extra layers: 10 layers in 4 stages -> 3, 3, 2, 2.
    """
    if not 1 <= num_stages <= num_layers:
        raise InvalidConfiguration(
            f"cannot split {num_layers} layers into {num_stages} stages "
            f"(need 1 <= stages <= layers)"
        )
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for i in range(num_stages):
        end = start + base + (1 if i < extra else 0)
        ranges.append(LayerRange(start, end))
        start = end
    return ranges
