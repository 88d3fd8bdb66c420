"""edged: an on-device inference daemon for edge gateways."""

__version__ = "0.1.0"
