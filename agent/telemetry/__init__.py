"""Telemetry: the sampler, Prometheus text, Home Assistant discovery."""
