"""What the composition root (`node.py`) wires parts with: message routing (`routing`),
the node's edges to the world (`edges`), the gateway's start-up (`gateway`), the parts
built from config (`parts`), the process set-up (`process`) and logging (`logs`)."""
