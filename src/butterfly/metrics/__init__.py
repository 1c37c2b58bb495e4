"""Metrics: events components emit, and the Prometheus collectors they feed."""
