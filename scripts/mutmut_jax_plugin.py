"""pytest plugin loaded by scripts/mutation_test.sh (never by the normal suite).

Two hooks: JAX caches are cleared at session start (below), and the targeted
test_mutants_*.py tests run first (`pytest_collection_modifyitems`).

Belt and braces. The script runs mutmut with process_isolation = forkserver
(warmup none), so no mutant's worker inherits a process that has run JAX. With
mutmut's default (fork), every mutant's run would be forked from the process
that already ran the tests once to map tests to functions; jax.jit keeps its
traces in memory, so the child would reuse the trace of the ORIGINAL code and
report a mutant inside a jitted function as "survived" although the mutated
Python never ran. Clearing JAX's in-memory caches at the start of each pytest
session makes every run trace the (mutated) code afresh either way.
"""

import jax


def pytest_sessionstart(session):
  del session
  jax.clear_caches()


def pytest_collection_modifyitems(session, config, items):
  """Runs the targeted tests (tests/**/test_mutants_*.py) first.

  mutmut passes a mutant's tests in no particular order and stops at the first
  failure (-x): the small, exact tests written against survivors fail within
  seconds, where the general tests may spend a minute compiling before one
  fails. Survivors still run every test.
  """
  del session, config
  items.sort(key=lambda item: "/test_mutants_" not in item.nodeid)
