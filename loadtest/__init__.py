"""gref-serve's load generation, shared by the load test and the HTTP benchmarks.

The load test (`python -m loadtest.run`, `make loadtest`): locust users (locustfile.py)
sending production-like traffic (traffic.py) in load shapes (shapes.py), a report from
locust's CSVs and two /metrics scrapes (report.py, scrapes.py, breakdown.py).

The benchmarks' load generator (tests/bench): closed- and open-loop phases from a process
of their own (driver.py) and open-loop schedules with every request accounted for
(schedules.py). Both halves start and place their processes with servers.py and
redis_server.py and read /metrics with scrapes.py. This package needs neither the tests
nor torch: what only the benchmarks need (test bundles, the simulated world's requests)
is in tests/support/load.py.
"""
