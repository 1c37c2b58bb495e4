"""Distinct id types so a node id is never passed where a stage index belongs.

`NewType` costs nothing at run time and mypy refuses to mix them up.
"""

from typing import NewType

NodeId = NewType("NodeId", int)
"""A node's index in the cluster's member list; stable for the cluster's life."""

RequestId = NewType("RequestId", str)
"""A task's id as the gateway hands it out (a UUID hex string)."""

Epoch = NewType("Epoch", int)
"""The membership/plan generation a message belongs to; stale epochs are refused."""

StageIndex = NewType("StageIndex", int)
"""Position of a stage in the pipeline, 0 = the stage holding the embedding."""

GATEWAY = NodeId(0)
"""The first gateway by default. The acting gateway is agreed state that moves among the
gateway-capable nodes (`control.gateway_role`); a running node looks it up, and this
constant is only the default of parts built without that lookup (tests, simulations)."""
