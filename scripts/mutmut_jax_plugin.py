"""pytest plugin loaded by scripts/mutation_test.sh (never by the normal suite).

mutmut 3 forks every mutant's test run from a process that has already run the
tests once (to map tests to functions). jax.jit keeps its traces in memory, so
a forked child would reuse the trace of the ORIGINAL code and report a mutant
in a jitted function as "survived" although the mutated Python never ran.
Clearing JAX's in-memory caches at the start of each pytest session makes every
mutant's run trace the (mutated) code afresh.
"""

import jax


def pytest_sessionstart(session):
  del session
  jax.clear_caches()
