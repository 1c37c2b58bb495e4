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
"""The node that serves the API, plans and samples (the gateway role does not move yet)."""
