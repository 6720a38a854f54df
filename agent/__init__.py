"""edgefleet device agent and the wire contract shared with the host tools."""

__version__ = "0.1.0"
