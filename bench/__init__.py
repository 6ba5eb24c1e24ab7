"""The benchmark behind PERFORMANCE.md: the gateway against an nginx anchor, same run, same box.

`python -m bench` (or `make bench`) starts an nginx upstream, an nginx configured as a key-checking,
rate-limiting gateway, and our gateway; pins them; drives each with wrk in turn; and reports
requests/s, latency and CPU-µs per request, with the ratio to nginx. See bench/README.md.
"""
