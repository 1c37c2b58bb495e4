"""Tasks: their state machine, queue, persistent store, and the engine that runs them."""
