"""scripts/plant_bugs.py: the list still matches the code, and the script's own machinery works.

A failure of `test_every_planted_bug_is_still_in_the_code` after a change to
the code means a line that holds a planted bug moved or changed: update its
entry in scripts/plant_bugs.py (see docs/planted_bugs.md).
"""

import importlib.util
import os
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script():
  spec = importlib.util.spec_from_file_location(
      "plant_bugs", os.path.join(ROOT, "scripts", "plant_bugs.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses resolve annotations through it
  spec.loader.exec_module(module)
  return module


pb = load_script()


def test_every_planted_bug_is_still_in_the_code():
  assert pb.problems(pb.BUGS, ROOT) == []
  assert len(pb.BUGS) >= 14


def test_problems_name_every_offender(tmp_path):
  (tmp_path / "m.py").write_text("x = 1\ny = 1\n")
  (tmp_path / "test_m.py").write_text("")
  bug = lambda i, orig, rep, tests=("test_m.py",): pb.Bug(i, "m.py", orig, rep, "", tests)
  bugs = [bug("twice", " = 1", " = 2"), bug("absent", "z = 1", "z = 2"),
          bug("same", "x = 1", "x = 1"), bug("syntax", "x = 1", "x = (1"),
          bug("no-test", "y = 1", "y = 2", ("test_gone.py",)), bug("twice", "x = 1", "x = 3")]
  got = "\n".join(pb.problems(bugs, str(tmp_path)))
  for text in ("twice: the id is used twice", "twice: the original snippet occurs 2 times",
               "absent: the original snippet occurs 0 times", "same: the replacement is the",
               "syntax: the planted m.py does not compile",
               "no-test: listed test file test_gone.py does not exist"):
    assert text in got, got


def test_plants_in_a_copy_and_leaves_the_tree_alone(tmp_path):
  bug = pb.BUGS[0]
  copy = tmp_path / "copy"
  copy.mkdir()
  pb.copy_tree(str(copy), ROOT)
  assert (copy / "scripts" / "plant_bugs.py").is_file()
  assert not (copy / ".git").exists()
  pb.plant(bug, str(copy))
  planted = (copy / bug.file).read_text()
  assert bug.replacement in planted and bug.original not in planted
  with open(os.path.join(ROOT, bug.file)) as f:
    assert f.read().count(bug.original) == 1  # the real tree is untouched


def test_first_failure_from_junit(tmp_path):
  junit = tmp_path / "j.xml"
  junit.write_text(textwrap.dedent("""\
      <testsuites><testsuite>
        <testcase classname="tests.a.test_x" name="test_ok"/>
        <testcase classname="tests.a.test_x" name="test_bad[1]"><failure message="m"/></testcase>
        <testcase classname="tests.a.test_y" name="test_later"><error message="e"/></testcase>
      </testsuite></testsuites>"""))
  assert pb.first_failure(str(junit)) == "tests/a/test_x.py::test_bad[1]"
  assert pb.first_failure(str(tmp_path / "missing.xml")) == ""


def test_doc_tables_are_written_between_their_markers(tmp_path):
  doc = tmp_path / "doc.md"
  start, end = pb.MARKERS["results"]
  doc.write_text(f"intro\n{start}\nold\n{end}\noutro\n")
  bug = pb.BUGS[0]
  results = [pb.Result(bug, pb.Run(True, "caught", "tests/t.py::test_a|b", 3.2)),
             pb.Result(bug, pb.Run(False, "NOT caught", "", 10.0))]
  pb.write_between(str(doc), "results", pb.results_table(results))
  text = doc.read_text()
  assert text.startswith("intro\n") and text.endswith(f"{end}\noutro\n") and "old" not in text
  assert "`tests/t.py::test_a\\|b`" in text and "1 of 2 planted bugs caught." in text
  with pytest.raises(SystemExit, match="needs exactly one"):
    pb.write_between(str(doc), "catalogue", "x")
  assert pb.catalogue([bug]).count("\n") == 2  # header, rule, one row
