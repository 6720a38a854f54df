"""edgefleet host tools: convert, package, inspect and push models (`edgectl`)."""
