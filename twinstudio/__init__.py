"""The twinstudio CLI and end-to-end pipeline glue."""
__version__ = "0.1.0"
