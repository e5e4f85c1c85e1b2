"""The embedded DNS server: every node answers the cluster zone from its own catalogue.

* :mod:`mesh.dns.config` -- ``DnsConfig`` (zone, TTLs, sizes, limits, bind, upstream);
* :mod:`mesh.dns.catalog` -- the frozen ``Catalog`` snapshot and its freshness rules;
* :mod:`mesh.dns.answer` -- the answer logic and wire-form cache (sans I/O);
* :mod:`mesh.dns.adapter` -- UDP and TCP servers and forwarding (trio);
* :mod:`mesh.dns.metrics` -- statistics and Prometheus metric families;
* :mod:`mesh.dns.fakes` -- members and catalogues for tests and benchmarks.

``docs/dns.md`` describes names, response codes, TTLs and freshness.
"""
