"""End-to-end tests: real edge-agent and edgectl processes, crashes, installs, systemd."""
