"""`make demo`: the whole edgefleet loop on one machine, end to end, in a few minutes."""
