"""Cluster-wide decisions through PBFT: the node's agreement driver, the agreed command
kinds (plans, evictions, configuration changes) and the configuration consensus built on
them."""
