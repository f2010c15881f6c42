"""What the multi-process tests share: ports, process tracking, launching N ranks of a scenario, and the oracle
that computes the expected rebuild independently of the library."""
