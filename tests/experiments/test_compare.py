"""experiments.benchmarks.compare on a tiny fake benchmark in a temporary git repo.

The fake repo has its own `inq_jax` and `experiments.benchmarks.fake`; the
reference commit and the working tree differ in both, so which code ran shows
in the figures. No timing is asserted.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from experiments.benchmarks import compare

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The reference's benchmark: no --scale flag, prints `old_only`.
FAKE_REF = """
import argparse, json, os, time
import inq_jax
parser = argparse.ArgumentParser()
parser.add_argument("--size", type=int, default=1)
args = parser.parse_args()
counter = os.environ["FAKE_COUNTER"]
n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
open(counter, "w").write(str(n))
if os.environ.get("FAKE_SLEEP"):
  time.sleep(float(os.environ["FAKE_SLEEP"]))
print("some log line")
print(json.dumps({"benchmark": "fake", "seconds": inq_jax.VALUE * args.size, "call": n,
                  "nested": {"ms": [2.0, 4.0]}, "same": 7, "flag": True, "name": "x",
                  "old_only": 1.5, "inq_jax": inq_jax.__file__}))
"""

# The working tree's: takes --scale, prints `new_only`, no `old_only`.
FAKE_TREE = """
import argparse, json, os
import inq_jax
parser = argparse.ArgumentParser()
parser.add_argument("--size", type=int, default=1)
parser.add_argument("--scale", type=float, default=1.0)
args = parser.parse_args()
counter = os.environ["FAKE_COUNTER"]
n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
open(counter, "w").write(str(n))
print(json.dumps({"benchmark": "fake", "seconds": inq_jax.VALUE * args.size * args.scale,
                  "call": n, "nested": {"ms": [1.0, 8.0]}, "same": 7, "flag": False,
                  "name": "y", "new_only": 2, "inq_jax": inq_jax.__file__}))
"""


def _git(repo, *args):
  return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                        check=True).stdout


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(textwrap.dedent(text))


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
  """A git repo whose HEAD has the reference's code and whose working tree the new code."""
  repo = tmp_path / "repo"
  for package in ("experiments", "experiments/benchmarks", "inq_jax"):
    _write(repo / package / "__init__.py", "")
  _write(repo / "inq_jax" / "__init__.py", "VALUE = 1.0\n")
  _write(repo / "experiments" / "benchmarks" / "fake.py", FAKE_REF)
  _git(tmp_path, "init", "--quiet", str(repo))
  _git(repo, "add", ".")
  _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "ref")
  # The working tree: uncommitted changes to the library and the benchmark.
  _write(repo / "inq_jax" / "__init__.py", "VALUE = 3.0\n")
  _write(repo / "experiments" / "benchmarks" / "fake.py", FAKE_TREE)
  monkeypatch.setenv("FAKE_COUNTER", str(tmp_path / "counter"))
  return repo


def _worktrees(repo):
  return [line for line in _git(repo, "worktree", "list", "--porcelain").splitlines()
          if line.startswith("worktree ")]


def test_runs_each_tree_alternately_and_reports_medians_and_ratios(fake_repo):
  result = compare.compare(str(fake_repo), "HEAD", "experiments.benchmarks.fake",
                           ["--size=2", "--scale", "5"], runs=3, log=lambda msg: None)
  # Each side ran its own code: the working tree's inq_jax (3.0) and --scale,
  # the reference's inq_jax (1.0) without --scale, which it does not take.
  assert result["ref_args"] == ["--size=2"] and result["ref_args_dropped"] == ["--scale", "5"]
  assert result["fields"]["seconds"]["tree_runs"] == [30.0] * 3
  assert result["fields"]["seconds"]["ref_runs"] == [2.0] * 3
  assert result["fields"]["seconds"]["ratio"] == 15.0
  assert result["fields"]["seconds"]["pair_ratios"] == [15.0] * 3
  # Alternation: tree, ref | ref, tree | tree, ref; the shared counter numbers the
  # calls, so the tree had calls 1, 4, 5 and the reference 2, 3, 6.
  assert result["order"] == ["tree", "ref", "ref", "tree", "tree", "ref"]
  call = result["fields"]["call"]
  assert (call["tree_runs"], call["ref_runs"]) == ([1, 4, 5], [2, 3, 6])
  # (Ratios are rounded to 6 significant digits.)
  assert (call["tree"], call["ref"]) == (4.0, 3.0)
  assert call["ratio"] == pytest.approx(4 / 3, rel=1e-5)
  assert call["pair_ratios"] == pytest.approx([0.5, 4 / 3, 5 / 6], rel=1e-5)
  # Nested and list fields, by path; bools and strings are not figures.
  assert result["fields"]["nested.ms[0]"]["ratio"] == 0.5
  assert result["fields"]["nested.ms[1]"]["ratio"] == 2.0
  assert result["fields"]["same"]["ratio"] == 1.0
  assert not {"flag", "name", "benchmark", "inq_jax"} & set(result["fields"])
  assert result["only_tree"] == ["new_only"] and result["only_ref"] == ["old_only"]
  assert result["only_tree_medians"] == {"new_only": 2} and result["only_ref_medians"] == {
      "old_only": 1.5}
  assert result["ref_commit"] == _git(fake_repo, "rev-parse", "HEAD").strip()
  assert result["tree_dirty"] and result["runs"] == 3
  # The temporary worktree is gone, from disk and from git's list.
  assert not os.path.exists(result["ref_worktree"])
  assert len(_worktrees(fake_repo)) == 1


def test_script_tree_runs_the_working_trees_benchmark_against_the_reference_library(fake_repo):
  result = compare.compare(str(fake_repo), "HEAD", "experiments.benchmarks.fake", ["--scale=5"],
                           runs=1, script="tree", log=lambda msg: None)
  # The same script (the tree's: --scale taken, new_only printed) on both sides,
  # each with its own inq_jax: 3.0 * 5 against 1.0 * 5.
  assert result["script"] == "tree" and result["ref_args"] == ["--scale=5"]
  assert result["ref_args_dropped"] == [] and result["only_tree"] == result["only_ref"] == []
  assert result["fields"]["seconds"]["tree_runs"] == [15.0]
  assert result["fields"]["seconds"]["ref_runs"] == [5.0]
  assert not os.path.exists(result["ref_worktree"]) and len(_worktrees(fake_repo)) == 1
  # The working tree's copy is untouched.
  assert "--scale" in (fake_repo / "experiments" / "benchmarks" / "fake.py").read_text()


def test_command_line_prints_json_then_table(fake_repo):
  out = subprocess.run([sys.executable, "-m", "experiments.benchmarks.compare",
                        "--repo", str(fake_repo), "--ref", "HEAD", "--runs", "1", "fake"],
                       capture_output=True, text=True, check=False, cwd=ROOT)
  assert out.returncode == 0, out.stderr
  first, *rest = out.stdout.splitlines()
  result = json.loads(first)
  assert result["benchmark"] == "fake" and result["fields"]["seconds"]["ratio"] == 3.0
  text = "\n".join(rest)
  assert "seconds" in text and "3.000" in text
  assert "only in tree: new_only" in text and "only in ref: old_only" in text
  assert "equal in every run: same=7" in text
  assert "[compare] run 1/1 tree" in out.stderr and "[compare] run 1/1 ref" in out.stderr
  assert len(_worktrees(fake_repo)) == 1


def test_the_runs_import_their_own_trees_packages(fake_repo, monkeypatch):
  """PYTHONPATH naming the working tree does not leak into the reference's runs."""
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake_repo), "/elsewhere"]))
  env = compare.child_env("/ref/root", [str(fake_repo)], keep_cache=False)
  assert env["PYTHONPATH"].split(os.pathsep) == ["/ref/root", "/elsewhere"]
  result = compare.compare(str(fake_repo), "HEAD", "experiments.benchmarks.fake", [],
                           runs=1, log=lambda msg: None)
  assert result["fields"]["seconds"]["ref_runs"] == [1.0]
  assert result["fields"]["seconds"]["tree_runs"] == [3.0]


def test_compilation_cache_is_off_unless_kept(monkeypatch):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/some/cache")
  assert "JAX_COMPILATION_CACHE_DIR" not in compare.child_env("/r", [], keep_cache=False)
  assert compare.child_env("/r", [], keep_cache=True)["JAX_COMPILATION_CACHE_DIR"] == "/some/cache"


def test_a_bad_ref_is_a_clear_error(fake_repo):
  out = subprocess.run([sys.executable, "-m", "experiments.benchmarks.compare",
                        "--repo", str(fake_repo), "--ref", "no-such-commit", "fake"],
                       capture_output=True, text=True, check=False, cwd=ROOT)
  assert out.returncode == 2
  assert "--ref 'no-such-commit' is not a commit in" in out.stderr, out.stderr
  assert out.stdout == "" and len(_worktrees(fake_repo)) == 1


def test_default_ref_is_the_newest_v_tag_else_origin_main_else_an_error(fake_repo):
  with pytest.raises(compare.CompareError, match="no v\\* tag and no origin/main; pass one "
                                                 "with --ref"):
    compare.default_ref(str(fake_repo))
  head = _git(fake_repo, "rev-parse", "HEAD").strip()
  _git(fake_repo, "update-ref", "refs/remotes/origin/main", head)
  assert compare.default_ref(str(fake_repo)) == "origin/main"
  for tag in ("v0.9", "v0.10", "v0.2", "other"):
    _git(fake_repo, "tag", tag, head)
  assert compare.default_ref(str(fake_repo)) == "v0.10"
  result = compare.compare(str(fake_repo), None, "experiments.benchmarks.fake", [], runs=1,
                           log=lambda msg: None)
  assert result["ref"] == "v0.10" and result["ref_commit"] == head


def test_a_benchmark_missing_from_the_reference_or_failing_is_an_error(fake_repo):
  _write(fake_repo / "experiments" / "benchmarks" / "new.py", "print('{}')\n")
  with pytest.raises(compare.CompareError, match="has no experiments.benchmarks.new"):
    compare.compare(str(fake_repo), "HEAD", "experiments.benchmarks.new", [], runs=1,
                    log=lambda msg: None)
  with pytest.raises(compare.CompareError, match="no benchmark experiments.benchmarks.nope"):
    compare.compare(str(fake_repo), "HEAD", "experiments.benchmarks.nope", [], runs=1,
                    log=lambda msg: None)
  _write(fake_repo / "experiments" / "benchmarks" / "fake.py", "raise SystemExit('broken')\n")
  with pytest.raises(compare.CompareError, match="(?s)exit status 1.*broken"):
    compare.compare(str(fake_repo), "HEAD", "experiments.benchmarks.fake", [], runs=1,
                    log=lambda msg: None)
  assert len(_worktrees(fake_repo)) == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_worktree_is_removed_when_interrupted(fake_repo, monkeypatch, sig):
  monkeypatch.setenv("FAKE_SLEEP", "60")
  # SIGINT as a terminal's Ctrl-C finds it: a child inherits an ignored SIGINT
  # (as test runners' workers and background shell jobs have it), and Python then
  # installs no KeyboardInterrupt handler, so the tool would sleep the signal out.
  proc = subprocess.Popen([sys.executable, "-m", "experiments.benchmarks.compare",
                           "--repo", str(fake_repo), "--ref", "HEAD", "--runs", "1", "fake"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    # The tree's run comes first (its code does not sleep), then the reference's,
    # which sleeps: interrupt the tool while that run is going.
    line = proc.stderr.readline()
    assert "run 1/1 tree" in line, line
    ref_tree = _worktrees(fake_repo)[1].split(" ", 1)[1]
    assert os.path.isdir(ref_tree)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)  # generous: a loaded machine is slow to clean up
  finally:
    proc.kill()
  assert proc.returncode == 130 and "interrupted" in err, err
  assert len(_worktrees(fake_repo)) == 1 and not os.path.exists(ref_tree)


def test_the_worktree_record_goes_even_if_its_folder_went_first(fake_repo):
  other = fake_repo.parent / "other"
  _git(fake_repo, "worktree", "add", "--detach", "--quiet", str(other), "HEAD")
  with compare.ref_worktree(str(fake_repo), "HEAD") as path:
    assert os.path.isfile(os.path.join(path, "inq_jax", "__init__.py"))
    shutil.rmtree(path)
    shutil.rmtree(other)  # another stale worktree: not ours to prune
  listed = _worktrees(fake_repo)
  assert len(listed) == 2 and listed[1] == f"worktree {other}"


def test_arguments_the_reference_lacks_are_left_out():
  flags = {"--size", "--repeats"}
  assert compare.filter_args(["--size=2", "--new", "3", "--repeats", "1", "--flag"], flags) == (
      ["--size=2", "--repeats", "1"], ["--new", "3", "--flag"])
  assert compare.filter_args(["--rep=2"], flags) == (["--rep=2"], [])  # argparse prefixes
  assert compare.filter_args(["--x"], None) == (["--x"], [])  # no --help: all kept
  assert compare.module_name("quantize_speed") == "experiments.benchmarks.quantize_speed"
  assert compare.module_name("experiments/benchmarks/vs_pytorch.py") == (
      "experiments.benchmarks.vs_pytorch")


def test_flatten_keeps_finite_numbers_by_path():
  line = {"a": 1, "b": {"c": [2.5, None, "x", {"d": 10**30}]}, "e": True, "f": float("nan"),
          "g": "text", "h": [[1, 2]]}
  assert compare.flatten(line) == {"a": 1, "b.c[0]": 2.5, "b.c[3].d": 10**30, "h[0][0]": 1,
                                   "h[0][1]": 2}


def test_relative_paths_that_exist_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "workdir").mkdir()
  assert compare.absolute_paths(["--workdir=workdir", "workdir", "--n=3", "--x", "missing"]) == [
      f"--workdir={tmp_path / 'workdir'}", str(tmp_path / "workdir"), "--n=3", "--x", "missing"]


def test_compares_a_real_benchmark_against_head():
  """On this repository: both trees import their own packages and print comparable keys."""
  if subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                    check=False).returncode:
    pytest.skip("not a git checkout")
  out = subprocess.run([sys.executable, "-m", "experiments.benchmarks.compare", "--ref", "HEAD",
                        "--runs", "1", "quantize_speed", "--width_divisor=16", "--bits=3",
                        "--repeats=1"], capture_output=True, text=True, check=False, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.splitlines()[0])
  for key in ("first_init_seconds", "advance_seconds_max", "verify_seconds"):
    assert result["fields"][key]["ratio"] > 0, key
  assert not os.path.exists(result["ref_worktree"])
