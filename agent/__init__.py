"""The edgefleet device agent (``edge-agent``): receive, verify, validate, serve, roll back."""
