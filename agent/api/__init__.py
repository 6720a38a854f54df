"""The local HTTP API: server, routes, access guard, and the client the CLI uses."""
