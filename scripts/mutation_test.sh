#!/usr/bin/env bash
# Mutation testing of the inq_jax core with mutmut 3 (pip install mutmut).
#
#   scripts/mutation_test.sh MODULE [mutmut-run-args...]
#
# MODULE is one of: optim codebook partition state init advance packed packing
# Slow (minutes to hours on 2 cores): NOT part of .ci/run. Latest counts are in
# docs/mutation_testing.md.
#
# The working tree is never touched: the repository (tracked + untracked,
# non-ignored files) is copied to $MUT_WORKDIR/<module> (default
# /tmp/inq_mutmut/<module>), a [mutmut] section is appended to THAT copy's
# setup.cfg, and mutmut runs there (its mutants/ folder lives in the copy).
# Inspect survivors afterwards with:
#   cd /tmp/inq_mutmut/<module> && mutmut results && mutmut show <name>
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
MODULE=${1:?usage: scripts/mutation_test.sh optim|codebook|partition|state|init|advance|packed|packing [mutmut run args]}
shift
PY=${PYTHON:-$REPO/.venv/bin/python}
MUTMUT=${MUTMUT:-$(dirname "$PY")/mutmut}
JOBS=${MUT_JOBS:-2}

case "$MODULE" in
  optim)     SRC=inq_jax/optim.py
             TESTS=(tests/inq_jax/test_optim.py tests/inq_jax/test_mutants_optim.py) ;;
  codebook)  SRC=inq_jax/_codebook.py
             TESTS=(tests/inq_jax/test_codebook.py tests/inq_jax/test_mutants_codebook.py) ;;
  partition) SRC=inq_jax/_partition.py
             TESTS=(tests/inq_jax/test_partition.py tests/inq_jax/test_mutants_partition.py) ;;
  state)     SRC=inq_jax/_state.py
             TESTS=(tests/inq_jax/test_state.py tests/inq_jax/test_core_hostile.py
                    tests/inq_jax/test_mutants_state.py tests/inq_jax/test_core_sharding.py
                    tests/inq_jax/test_state_integrity.py) ;;
  init)      SRC=inq_jax/_init.py
             TESTS=(tests/inq_jax/test_state.py tests/inq_jax/test_mutants_state.py
                    tests/inq_jax/test_fit.py tests/inq_jax/test_user_mistakes.py
                    tests/inq_jax/test_core_sharding.py) ;;
  advance)   SRC=inq_jax/_advance.py
             TESTS=(tests/inq_jax/test_state.py tests/inq_jax/test_mutants_state.py
                    tests/inq_jax/test_state_integrity.py tests/inq_jax/test_fit.py
                    tests/inq_jax/test_core_hostile.py tests/inq_jax/test_core_sharding.py) ;;
  packed)    SRC=inq_jax/_packed.py
             TESTS=(tests/inq_jax/test_packed.py tests/inq_jax/test_state.py
                    tests/inq_jax/test_mutants_packed.py) ;;
  packing)   SRC=inq_jax/_packing.py
             TESTS=(tests/inq_jax/test_export.py tests/inq_jax/test_verify_file.py
                    tests/inq_jax/test_mutants_packing.py) ;;
  *) echo "unknown module: $MODULE" >&2; exit 2 ;;
esac

# MUT_TESTS="a.py b.py" replaces the module's test files (e.g. only the fast
# targeted tests/inq_jax/test_mutants_*.py for a first pass; then rerun the
# survivors by name with the full set).
if [[ -n "${MUT_TESTS:-}" ]]; then read -r -a TESTS <<< "$MUT_TESTS"; fi

WORK=${MUT_WORKDIR:-/tmp/inq_mutmut}/$MODULE
mkdir -p "$WORK"
# Fresh copy of the sources each time (keeps mutmut's cache in $WORK/mutants).
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard) |
  (cd "$REPO" && xargs -0 cp --parents -f -t "$WORK" 2>/dev/null || true)

{
  echo
  echo "[mutmut]"
  echo "source_paths = inq_jax"
  echo "only_mutate = $SRC"
  echo "pytest_add_cli_args ="
  echo "    -p"
  echo "    mutmut_jax_plugin"
  echo "    -x"
  echo "    -q"
  echo "    -p"
  echo "    no:cacheprovider"
  if [[ "$MODULE" == packing ]]; then
    echo "    -k"
    echo "    not hostile"
  fi
  echo "pytest_add_cli_args_test_selection ="
  for t in "${TESTS[@]}"; do [[ -e "$REPO/$t" ]] && echo "    $t"; done
  echo "use_git_change_detection = false"
  # A mutant that breaks a loop's exit (the binary searches in _partition and
  # _packed) spins inside one XLA while loop until mutmut's CPU-time limit,
  # 2 * multiplier * (its tests' time + 1 s): with the default 15, ~5 minutes
  # each. MUT_TIMEOUT_MULTIPLIER lowers it (changing it re-runs only timeouts).
  [[ -n "${MUT_TIMEOUT_MULTIPLIER:-}" ]] && echo "timeout_multiplier = $MUT_TIMEOUT_MULTIPLIER"
  # Fork each mutant's run from a server that has NOT started XLA: forking a
  # process whose XLA thread pools are running deadlocks the child (seen with
  # the default process_isolation = fork: children sat at 0% CPU for minutes).
  echo "process_isolation = forkserver"
  # The server imports the third-party modules (not inq_jax) before it forks:
  # importing JAX starts no XLA thread, so this is safe and saves ~3 s a mutant.
  echo "forkserver_warmup = import"
  echo "preload_modules_file = $REPO/scripts/mutmut_preload.txt"
} >> "$WORK/setup.cfg"

cd "$WORK"
export PYTHONPATH="$REPO/scripts${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS=cpu
# Every mutant's tests run in a fresh process that compiles its programs again;
# most mutants leave the traced programs unchanged (checks, messages, host
# code), so an on-disk cache of every compilation, however short, serves them.
# A mutant that changes a program changes its HLO, the cache key: no stale hit.
export JAX_COMPILATION_CACHE_DIR=${MUT_XLA_CACHE:-${MUT_WORKDIR:-/tmp/inq_mutmut}/xla_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
"$MUTMUT" run --max-children "$JOBS" "$@"
"$MUTMUT" results --all true 2>/dev/null || "$MUTMUT" results
