"""The cluster layer: stage servers, the pipeline engine, membership, the local launcher."""
