"""A model's life on the device: the state machine, validation, the durable store."""
