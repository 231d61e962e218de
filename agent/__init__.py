"""jetagent: the daemon, the wire protocol, and both command-line tools."""

__version__ = "0.1.0"
