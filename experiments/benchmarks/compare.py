"""Runs a benchmark on the working tree and on a reference commit, alternately, and prints ratios.

    python -m experiments.benchmarks.compare [--ref REF] [--runs 3] BENCHMARK [ARGS...]

BENCHMARK is a module of experiments/benchmarks/ (`quantize_speed`, or its
dotted name); ARGS go to it. For example:

    python -m experiments.benchmarks.compare --ref 0106521 quantize_speed

The reference is checked out as a temporary `git worktree` (detached; removed
afterwards, also on Ctrl-C or SIGTERM). Every run is a fresh process, so
first-call figures include compilation on both sides; the two trees take
turns, the first of each pair alternating (tree, ref, ref, tree, ...), `--runs`
runs each. A run of the reference imports the reference's own `inq_jax` and
`experiments` (its cwd and PYTHONPATH are the reference worktree), and JAX's
persistent compilation cache is switched off for both (JAX_COMPILATION_CACHE_DIR
is removed from their environment) unless `--keep_cache`.

REF defaults to the newest `v*` tag (version order), else `origin/main`; a
clone with neither needs `--ref`. By default each tree runs its own benchmark
script, so a benchmark whose measurement changed compares two measurements:
`--script tree` runs the working tree's script in both (copied into the
reference worktree; what it imports still comes from the reference), which
isolates the code under test. ARGS the reference's own script does not list in
its `--help` are left out of its command line (and named in the output).
Relative paths among ARGS that exist are made absolute, so both trees read the
same files.

Output, on stdout: one JSON line, then a table. For every numeric field both
trees print (nested fields as `a.b`, list items as `a[0]`): the median of each
tree's runs and `ratio` = tree median / ref median, so for a time a ratio above
1 is a slip whatever the machine's speed (for a rate, e.g. images per second or
a speedup, below 1 is). Fields only one tree prints are listed (with their
medians in the JSON line), not compared.
The JSON line also carries every run's value, the order the runs took, and the
load average before and after (the figures of a shared machine are noisy).
Progress goes to stderr. Exit status 0, or 1 when a run failed (its stderr
tail is shown), 2 for a bad command line or reference.
"""

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

_PACKAGE = "experiments.benchmarks"


class CompareError(Exception):
  """A failure to report as one message: a bad reference, a benchmark that failed."""

  def __init__(self, message, status=1):
    super().__init__(message)
    self.status = status


def _git(repo, *args, check=True):
  out = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, check=False)
  if check and out.returncode:
    raise CompareError(f"git {' '.join(args)} failed in {repo}: {out.stderr.strip()}", status=2)
  return out


def repo_root(path):
  """The top of the git working tree holding `path`."""
  out = _git(path, "rev-parse", "--show-toplevel", check=False)
  if out.returncode:
    raise CompareError(f"{path} is not inside a git working tree: {out.stderr.strip()}",
                       status=2)
  return out.stdout.strip()


def default_ref(repo):
  """The newest `v*` tag (version order), else `origin/main`; CompareError without either."""
  tags = _git(repo, "tag", "--list", "v*", "--sort=-v:refname").stdout.split()
  if tags:
    return tags[0]
  if not _git(repo, "rev-parse", "--verify", "--quiet", "origin/main^{commit}",
              check=False).returncode:
    return "origin/main"
  raise CompareError(
      f"no reference to compare with: {repo} has no v* tag and no origin/main; "
      "pass one with --ref (a commit, tag or branch, e.g. --ref HEAD~1)", status=2)


def resolve(repo, ref):
  """The full commit hash `ref` names; CompareError if it names none."""
  out = _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
  if out.returncode:
    raise CompareError(f"--ref {ref!r} is not a commit in {repo} (git rev-parse --verify "
                       f"found none; try a hash from `git log --oneline`)", status=2)
  return out.stdout.strip()


def describe_tree(repo):
  """(HEAD's short hash, whether tracked files differ from HEAD) of the working tree."""
  head = _git(repo, "rev-parse", "--short", "HEAD", check=False).stdout.strip() or "none"
  dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no",
                    check=False).stdout.strip())
  return head, dirty


@contextlib.contextmanager
def _terminate_as_interrupt():
  """SIGTERM and SIGHUP raise KeyboardInterrupt, so `finally` blocks run as on Ctrl-C."""

  def handler(signum, frame):
    del frame
    raise KeyboardInterrupt(f"signal {signum}")

  previous = {}
  for sig in (signal.SIGTERM, signal.SIGHUP):
    try:
      previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
      pass
  try:
    yield
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


@contextlib.contextmanager
def _no_interrupts():
  """Ctrl-C ignored inside (main thread only): cleanup must not stop half way."""
  try:
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
  except ValueError:  # not the main thread: signals go to the main thread anyway
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, old)


@contextlib.contextmanager
def ref_worktree(repo, commit):
  """A detached `git worktree` of `commit` in a temporary folder, removed on exit.

  Only this worktree is removed (never `git worktree prune`, which would also
  drop other worktrees whose folders happen to be missing).
  """
  parent = tempfile.mkdtemp(prefix="inq_jax_compare_")
  path = os.path.join(parent, "ref")
  admin = None
  try:
    _git(repo, "worktree", "add", "--detach", "--quiet", path, commit)
    admin = _git(path, "rev-parse", "--absolute-git-dir").stdout.strip()
    yield path
  finally:
    with _no_interrupts():
      removed = not _git(repo, "worktree", "remove", "--force", "--force", path,
                         check=False).returncode
      shutil.rmtree(parent, ignore_errors=True)
      if not removed and admin and os.path.isdir(admin):
        # git's record of this worktree (.git/worktrees/<name>), if the folder
        # went first: only if it names our folder.
        with contextlib.suppress(OSError):
          with open(os.path.join(admin, "gitdir"), encoding="utf-8") as f:
            if os.path.dirname(f.read().strip()) == path:
              shutil.rmtree(admin, ignore_errors=True)


def module_name(benchmark):
  name = benchmark[:-3] if benchmark.endswith(".py") else benchmark
  name = name.replace("/", ".")
  return name if name.startswith(_PACKAGE + ".") else f"{_PACKAGE}.{name}"


def module_file(root, module):
  return os.path.join(root, *module.split(".")) + ".py"


def child_env(root, other_roots, keep_cache):
  """The environment of a run in `root`: its packages first, none of the other tree's."""
  env = dict(os.environ)
  drop = {os.path.realpath(r) for r in other_roots}
  kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
          if p and os.path.realpath(p) not in drop]
  env["PYTHONPATH"] = os.pathsep.join([root] + kept)
  if not keep_cache:
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def check_imports(root, env):
  """Raises unless a process in `root` with `env` finds `inq_jax` and `experiments` there."""
  code = ("import importlib.util, json\n"
          "specs = [importlib.util.find_spec(n) for n in ('inq_jax', 'experiments')]\n"
          "print(json.dumps([s.origin if s else None for s in specs]))")
  out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, check=False)
  if out.returncode:
    raise CompareError(f"python could not look up the packages in {root}: {out.stderr[-2000:]}")
  real = os.path.realpath(root) + os.sep
  for name, origin in zip(("inq_jax", "experiments"), json.loads(out.stdout)):
    if origin is not None and not os.path.realpath(origin).startswith(real):
      raise CompareError(f"a run in {root} would import {name} from {origin}, not from "
                         "its own tree")


def supported_flags(root, module, env):
  """The `--flags` the benchmark's `--help` lists in `root`, or None if it gave no help."""
  out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=root, env=env,
                       capture_output=True, text=True, check=False)
  if out.returncode:
    return None
  return set(re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", out.stdout))


def filter_args(args, flags):
  """(args the benchmark takes, args left out): flags not in `flags`, with their values."""
  if flags is None:
    return list(args), []
  kept, dropped = [], []
  i = 0
  while i < len(args):
    arg = args[i]
    name = arg.split("=", 1)[0]
    if arg.startswith("--") and not any(f.startswith(name) for f in flags):
      group = [arg]
      if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("-"):
        group.append(args[i + 1])
      dropped.extend(group)
      i += len(group)
      continue
    kept.append(arg)
    i += 1
  return kept, dropped


def absolute_paths(args):
  """`args` with relative paths that exist here (as values or `--flag=value`) made absolute."""
  out = []
  for arg in args:
    flag, sep, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
    if value and not os.path.isabs(value) and os.path.exists(value) and (
        sep or not arg.startswith("-")):
      arg = f"{flag}{sep}{os.path.abspath(value)}"
    out.append(arg)
  return out


def run_once(root, module, args, env, timeout):
  """Runs the benchmark in `root`: (its JSON line as a dict, wall seconds)."""
  cmd = [sys.executable, "-m", module, *args]
  start = time.perf_counter()
  try:
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                         check=False, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    raise CompareError(f"{' '.join(cmd)} (in {root}) ran past --timeout {timeout} s") from e
  wall = time.perf_counter() - start
  line = None
  for text in reversed(out.stdout.splitlines()):
    with contextlib.suppress(ValueError):
      line = json.loads(text)
      if isinstance(line, dict):
        break
      line = None
  if out.returncode or line is None:
    why = f"exit status {out.returncode}" if out.returncode else "no JSON line on stdout"
    raise CompareError(f"{' '.join(cmd)} (in {root}) failed: {why}\n"
                       f"--- stderr (tail) ---\n{out.stderr[-3000:]}"
                       f"--- stdout (tail) ---\n{out.stdout[-1000:]}")
  return line, wall


def flatten(value, prefix=""):
  """{'a.b[0]': number} for every int or float (not bool) in a JSON value."""
  if isinstance(value, bool):
    return {}
  if isinstance(value, (int, float)):
    return {prefix: value} if math.isfinite(value) else {}
  items = []
  if isinstance(value, dict):
    items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in value.items()]
  elif isinstance(value, list):
    items = [(f"{prefix}[{i}]", v) for i, v in enumerate(value)]
  out = {}
  for key, v in items:
    out.update(flatten(v, key))
  return out


def summarize(tree_lines, ref_lines):
  """Medians per tree and their ratio for every numeric field both trees print."""
  tree = [flatten(line) for line in tree_lines]
  ref = [flatten(line) for line in ref_lines]
  keys = lambda runs: list(dict.fromkeys(k for r in runs for k in r))
  tree_keys, ref_keys = keys(tree), keys(ref)
  ref_set, tree_set = set(ref_keys), set(tree_keys)
  fields = {}
  for key in tree_keys:
    if key not in ref_set:
      continue
    t = [r[key] for r in tree if key in r]
    f = [r[key] for r in ref if key in r]
    t_med, f_med = float(np.median(t)), float(np.median(f))
    # Run i of the tree against run i of the ref (the same alternation):
    # their spread is what the machine's noise does to one pair.
    pairs = [_round(a[key] / b[key]) for a, b in zip(tree, ref)
             if key in a and key in b and b[key]]
    fields[key] = {"tree": _round(t_med), "ref": _round(f_med),
                   "ratio": _round(t_med / f_med) if f_med else None,
                   "pair_ratios": pairs, "tree_runs": t, "ref_runs": f}
  median = lambda runs, key: _round(float(np.median([r[key] for r in runs if key in r])))
  only_tree = [k for k in tree_keys if k not in ref_set]
  only_ref = [k for k in ref_keys if k not in tree_set]
  return {"fields": fields, "only_tree": only_tree, "only_ref": only_ref,
          "only_tree_medians": {k: median(tree, k) for k in only_tree},
          "only_ref_medians": {k: median(ref, k) for k in only_ref}}


def _round(x, digits=6):
  return float(f"{x:.{digits}g}")


def _load():
  return [round(x, 2) for x in os.getloadavg()]


def table(result):
  """The human-readable summary printed after the JSON line."""
  # Fields with one value in every run of both trees (sizes, settings, targets)
  # go on one line at the end.
  same = {k: f for k, f in result["fields"].items()
          if len(set(f["tree_runs"] + f["ref_runs"])) == 1}
  fields = {k: f for k, f in result["fields"].items() if k not in same}
  width = max([len(k) for k in fields] + [5])
  script = ("each tree's own benchmark script" if result["script"] == "ref" else
            "the working tree's benchmark script in both")
  lines = [f"{result['benchmark']}: tree {result['tree']} vs ref {result['ref']} "
           f"({result['ref_commit'][:10]}), {result['runs']} run(s) each, alternated, "
           f"{script}",
           f"{'field':<{width}}  {'tree':>10}  {'ref':>10}  {'ratio':>7}  pair ratios"]
  for key, f in fields.items():
    ratio = "-" if f["ratio"] is None else f"{f['ratio']:.3f}"
    pairs = f["pair_ratios"]
    spread = (f"{min(pairs):.3f}-{max(pairs):.3f}" if len(pairs) > 1 else
              f"{pairs[0]:.3f}" if pairs else "-")
    lines.append(f"{key:<{width}}  {f['tree']:>10.5g}  {f['ref']:>10.5g}  {ratio:>7}  {spread}")
  if same:
    lines.append("equal in every run: " + ", ".join(f"{k}={f['tree']:g}" for k, f in same.items()))
  for side in ("tree", "ref"):
    keys = result["only_" + side]
    names = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all, listed in the JSON line)"
                                   if len(keys) > 8 else "")
    lines.append(f"only in {side}: {names or '-'}")
  if result["ref_args_dropped"]:
    lines.append("left out of the ref's command line (its --help lacks them): "
                 + " ".join(result["ref_args_dropped"]))
  lines.append(f"load average before {result['load_average_before']}, "
               f"after {result['load_average_after']}")
  return "\n".join(lines)


def compare(repo, ref, module, args, runs, timeout=None, keep_cache=False, script="ref",
            log=None):
  """Runs `module` `runs` times on each tree, alternately: the result as a dict.

  `script`: "ref" runs the reference's own benchmark file there, "tree" the
  working tree's (copied into the reference worktree).
  """
  if script not in ("ref", "tree"):
    raise CompareError(f"script must be 'ref' or 'tree', got {script!r}", status=2)
  log = log or (lambda msg: print(f"[compare] {msg}", file=sys.stderr, flush=True))
  repo = repo_root(repo)
  ref_name = ref or default_ref(repo)
  commit = resolve(repo, ref_name)
  if not os.path.exists(module_file(repo, module)):
    raise CompareError(f"no benchmark {module} in {repo} ({module_file(repo, module)} is "
                       "missing)", status=2)
  head, dirty = describe_tree(repo)
  args = absolute_paths(args)
  load_before = _load()
  start = time.perf_counter()
  with _terminate_as_interrupt(), ref_worktree(repo, commit) as ref_root:
    if script == "tree":
      if not os.path.isdir(os.path.dirname(module_file(ref_root, module))):
        raise CompareError(f"the reference {ref_name} ({commit[:10]}) has no "
                           f"{module.rsplit('.', 1)[0]} package", status=2)
      shutil.copyfile(module_file(repo, module), module_file(ref_root, module))
    if not os.path.exists(module_file(ref_root, module)):
      raise CompareError(f"the reference {ref_name} ({commit[:10]}) has no {module}", status=2)
    roots = {"tree": repo, "ref": ref_root}
    envs = {side: child_env(root, [r for r in roots.values() if r != root], keep_cache)
            for side, root in roots.items()}
    for side, root in roots.items():
      check_imports(root, envs[side])
    side_args = {"tree": args, "ref": args}
    dropped = []
    if args and script == "ref":
      side_args["ref"], dropped = filter_args(args, supported_flags(ref_root, module,
                                                                    envs["ref"]))
      if dropped:
        log(f"the reference's {module} does not take {' '.join(dropped)}: left out")
    lines = {"tree": [], "ref": []}
    order = []
    for i in range(runs):
      for side in (("tree", "ref") if i % 2 == 0 else ("ref", "tree")):
        line, wall = run_once(roots[side], module, side_args[side], envs[side], timeout)
        lines[side].append(line)
        order.append(side)
        log(f"run {i + 1}/{runs} {side}: {wall:.1f} s, load average {_load()}")
  result = {"benchmark": module.rsplit(".", 1)[-1], "comparison": "tree/ref",
            "tree": f"{repo} at {head}" + (" with uncommitted changes" if dirty else ""),
            "tree_commit": head, "tree_dirty": dirty, "ref": ref_name, "ref_commit": commit,
            "ref_worktree": ref_root, "script": script, "runs": runs, "order": order,
            "args": args, "ref_args": side_args["ref"], "ref_args_dropped": dropped,
            "compilation_cache": "kept" if keep_cache else "off",
            "load_average_before": load_before, "load_average_after": _load(),
            "wall_seconds": round(time.perf_counter() - start, 1)}
  result.update(summarize(lines["tree"], lines["ref"]))
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m experiments.benchmarks.compare", description=__doc__.split("\n")[0],
      epilog="Example: python -m experiments.benchmarks.compare --ref 0106521 --runs 3 "
             "quantize_speed")
  parser.add_argument("--ref", default=None,
                      help="the reference commit, tag or branch (default: the newest v* tag, "
                           "else origin/main)")
  parser.add_argument("--runs", type=int, default=3, help="runs of each tree (alternated)")
  parser.add_argument("--repo", default=".",
                      help="any folder of the git working tree to measure (default: here)")
  parser.add_argument("--timeout", type=float, default=None,
                      help="seconds one run may take (default: no limit)")
  parser.add_argument("--keep_cache", action="store_true",
                      help="keep JAX_COMPILATION_CACHE_DIR in the runs' environment")
  parser.add_argument("--script", choices=("ref", "tree"), default="ref",
                      help="whose benchmark file the reference runs: its own (default) or "
                           "the working tree's (the same measurement on both)")
  parser.add_argument("benchmark", help="a module of experiments/benchmarks/, e.g. quantize_speed")
  parser.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags")
  opts = parser.parse_args(argv)
  if opts.runs < 1:
    parser.error(f"--runs must be at least 1, got {opts.runs}")
  try:
    result = compare(opts.repo, opts.ref, module_name(opts.benchmark), opts.args, opts.runs,
                     opts.timeout, opts.keep_cache, opts.script)
  except CompareError as e:
    print(f"compare: error: {e}", file=sys.stderr)
    return e.status
  except KeyboardInterrupt:
    print("compare: interrupted; the reference worktree was removed", file=sys.stderr)
    return 130
  print(json.dumps(result))
  print(table(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
