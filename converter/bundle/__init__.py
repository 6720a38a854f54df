"""Writing bundles: golden vectors, chunked artifacts, the signed manifest."""
