"""edgefleet: ship TFLite models to edge boards over MQTT and keep them running.

This package is the shared core (wire contract, MQTT transport, runtime backends, bundle format,
errors); ``edgefleet.agent`` is the device daemon and ``edgefleet.converter`` the host tool.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgefleet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
