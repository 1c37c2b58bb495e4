"""Seed 000's "Work Assignment Strategies" example, on the placement a cluster runs.

20 layers, 4 nodes, four strategies, planned by `partition.service.PartitionService`,
the service the gateway's planner (`control.planner.place`) asks for every epoch's plan.
Layer i costs (i + 1) GFLOP per token and every node runs 1 TFLOP/s, plus a fixed 2 ms
per layer (`NodeCapability.layer_overhead_ms`, which nodes measure): the cost model the
seed's own RoundRobin rows imply (5 layers of 1, 5, 9, 13, 17 GFLOP print as 55 ms).
Nodes 0 and 2 share one rack, 1 and 3 another; links inside a rack are fast, between
racks slow, which is what topology_aware pays attention to.

Where it departs from the seed: the seed's WorkAssigner hands a node any set of layers
(round robin deals layer i to node i mod 4; its LoadBalanced reaches 0.8% imbalance by
scattering layers, so activations change node at most of the 19 layer boundaries, every
token). A pipeline runs each node's layers as one contiguous stage `[start, end)`, one
activation transfer per stage boundary, so the strategies are the pipeline's:

    seed           Butterfly        what it does
    RoundRobin     uniform          equal layer counts (5 each), contiguous
    LoadBalanced   load_balanced    the contiguous split whose slowest stage is fastest
    TopologyAware  topology_aware   also picks the node order, charging each link
    Hybrid         hybrid           within 5% of the best bottleneck, fewest stages

Stage times include sending the activations on (0.1 ms inside a rack, 2 ms across).
The best pipeline here (topology_aware, which keeps the racks together) has a 70.1 ms
slowest stage, an 11.2% imbalance, not the seed's 0.8%: contiguous ranges of layers
whose costs grow from 3 to 22 ms cannot be cut evenly. A pipeline's speed is set by its
slowest stage, and it pays 3 transfers per token where the seed's assignment pays 16.

    .venv/bin/python examples/work_assignment.py
"""

from __future__ import annotations

from butterfly.partition.capability import Link, NodeCapability
from butterfly.partition.service import PartitionService
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerInfo, Linear, PartitionStrategy

NAMES = {
    PartitionStrategy.UNIFORM: "RoundRobin -> uniform",
    PartitionStrategy.LOAD_BALANCED: "LoadBalanced -> load_balanced",
    PartitionStrategy.TOPOLOGY_AWARE: "TopologyAware -> topology_aware",
    PartitionStrategy.HYBRID: "Hybrid -> hybrid",
}
LAYER_OVERHEAD_MS = 2.0


def create_layers(count: int) -> list[LayerInfo]:
    return [
        LayerInfo(
            id=i,
            layer_type=Linear(input_dim=768, output_dim=768),
            compute_cost=(i + 1.0) * 1e9,  # varying costs
            memory_bytes=1024 * 1024,
            output_size=768,
        )
        for i in range(count)
    ]


def create_nodes() -> list[NodeCapability]:
    rack = {0: "a", 1: "b", 2: "a", 3: "b"}
    near, far = Link(latency_ms=0.1, bandwidth_bytes_per_s=10e9), Link(2.0, 1e9)
    return [
        NodeCapability(
            id=NodeId(k),
            flops_per_s=1e12,
            memory_bytes=1 << 30,
            links={NodeId(j): near if rack[j] == rack[k] else far for j in rack if j != k},
            layer_overhead_ms=LAYER_OVERHEAD_MS,
        )
        for k in rack
    ]


def main() -> None:
    layers, nodes = create_layers(20), create_nodes()
    service = PartitionService()
    for strategy in PartitionStrategy:
        plan = service.plan(layers, nodes, strategy)
        print(f"\n{NAMES[strategy]} Strategy:")
        for stage in plan.stages:
            r = stage.layers
            print(
                f"  Node NodeId({stage.node}): {r.end - r.start} layers [{r.start}, {r.end}), "
                f"{stage.estimated_ms:.2f}ms"
            )
        print(f"  Load imbalance: {plan.quality.imbalance_pct:.1f}%")
        print(
            f"  Slowest stage {plan.bottleneck_ms:.2f}ms, "
            f"{len(plan.stages) - 1} activation transfers per token, "
            f"{plan.quality.transfer_ms_per_token:.2f}ms on the links"
        )


if __name__ == "__main__":
    main()
