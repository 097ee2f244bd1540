"""labdaq: data acquisition for a battery testing laboratory."""

__version__ = "0.1.0"
