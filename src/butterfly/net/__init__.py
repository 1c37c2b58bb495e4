"""Moving messages and tensors between nodes: framing, connections, transports."""
