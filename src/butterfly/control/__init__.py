"""The control plane: who is alive (`heartbeats`, `membership`), what each node can do
(`facts`, `status`), which plan runs (`planner`, `replicas`, `plans`) and what happens
when a node fails or lies: `policy` decides (pure functions), `recovery` carries it out."""
