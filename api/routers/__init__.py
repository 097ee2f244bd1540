"""labdaq package."""
