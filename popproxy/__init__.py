"""popproxy: a POP3 proxy with TLS on both legs and message hooks, built on Twisted."""

__version__ = "0.1.0"
