"""The control plane: who is alive (`heartbeats`, `membership`), what each node can do
(`facts`), which plan runs (`planner`, `replicas`, `plans`) and what happens when a node
fails or lies (`recovery`)."""
