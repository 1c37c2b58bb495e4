"""The data plane: what one request's tokens cross. The gateway's pipeline engine
(`engine`), each node's stage server, and the checks on what stages return (`audit`,
`replicate`, `unresponsive`, `proving`)."""
