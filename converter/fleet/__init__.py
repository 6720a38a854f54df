"""The operator's side of the fleet: publish, canary, observe, watch, collect, inventory."""
