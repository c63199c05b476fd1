"""The fault-injection suite that tests/chaos runs: a stack on loopback (harness), the
scenarios, the runner and its report. Also a command: `python -m tests.support.chaos.run`."""
