"""egress-proxy: an allowlisting egress proxy for AWS VPCs, built on Squid and driven by a Python supervisor."""

__version__ = "0.1.0"
