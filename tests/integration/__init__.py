"""Integration tests: real Mosquitto brokers (TLS, ACL) with in-process agents and host tools."""
