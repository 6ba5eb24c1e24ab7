"""End-to-end tests: the gateway run as a program, driven by third-party clients and upstreams."""
