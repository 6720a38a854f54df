"""The device's side of the fleet: the MQTT link and chunked delivery."""
