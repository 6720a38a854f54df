"""Reading and running .tflite files on the host: structure, metadata, interpreters, latency."""
