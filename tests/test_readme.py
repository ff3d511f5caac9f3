"""The README and docs/ tell the truth: their code runs, their commands parse, their paths exist.

- Every ```python block runs (one namespace per page, in a temporary folder);
  a block after `<!-- excerpt: PATH -->` is a piece of an example program and
  must appear in PATH verbatim instead (the program itself runs in
  tests/test_examples.py).
- Every command of a ```sh block that runs a module of this repository names
  one that exists, passes only flags its `--help` lists, and, for
  `--config=FILE[:ARG]`, only `--config.X=V` overrides that the config has and
  that parse (ml_collections' own flag parser does the checking). Commands
  inside `gcloud ... --command="..."` are checked too.
- Every relative link and every repository path named in backquotes exists.
- docs/layout.md names every module of inq_jax/, experiments/ and examples/.

`test_the_checks_catch_planted_mistakes` shows each check failing on a stale
option, a missing path and a broken snippet.
"""

import functools
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
PATH_PREFIXES = ("inq_jax/", "experiments/", "examples/", "tests/", "scripts/", "docs/",
                 "results/", ".ci/")
THIRD_PARTY = {"pytest", "pip", "venv", "build", "tensorboard"}


def page_id(page):
  return str(page.relative_to(ROOT))


def code_blocks(text: str, lang: str):
  """[(code, excerpt path or None)] of the ```lang blocks of a markdown text."""
  out = []
  for m in re.finditer(r"(<!-- excerpt: (\S+) -->\n)?```" + lang + r"\n(.*?)```", text, re.S):
    out.append((m.group(3), m.group(2)))
  return out


# --- python -------------------------------------------------------------------------


def run_python_blocks(text: str, where: str, namespace: dict) -> dict:
  for code, excerpt in code_blocks(text, "python"):
    if excerpt is None:
      exec(compile(code, where, "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def excerpt_problems(text: str, root=ROOT) -> list:
  problems = []
  for code, excerpt in code_blocks(text, "python"):
    if excerpt is not None:
      source = root / excerpt
      if not source.is_file() or code not in source.read_text():
        problems.append(f"the excerpt of {excerpt} is not what {excerpt} runs:\n{code}")
  return problems


# --- commands -----------------------------------------------------------------------


def shell_commands(text: str) -> list:
  """Every simple command of the ```sh blocks, as token lists (nested --command= too)."""
  commands = []
  for code, _ in code_blocks(text, "sh"):
    pending = ""
    for line in re.sub(r"\\\n", " ", code).splitlines():
      pending += line + "\n"
      try:  # a quoted string may span lines: wait for its end
        shlex.split(pending, comments=True)
      except ValueError:
        continue
      commands += _split(pending)
      pending = ""
    if pending:
      commands += _split(pending)
  return commands


def _split(line: str) -> list:
  try:
    tokens = shlex.split(line, comments=True)
  except ValueError as e:
    raise AssertionError(f"cannot parse the command {line!r}: {e}") from None
  out, current = [], []
  for token in tokens + [";"]:
    if token in (";", "&&", "&", "||", "|", "do", "done", "then", "fi"):
      if current:
        out.append(current)
      current = []
      continue
    if token.startswith("--command="):  # gcloud ... ssh --command="..."
      for line in token[len("--command="):].splitlines():
        out += _split(line)
      continue
    current.append(token)
  return out


def _module_and_args(tokens):
  """(module, args) of a `... python -m MODULE ARGS` command, else None."""
  for i, token in enumerate(tokens):
    if re.search(r"(^|/)python3?$", token) and tokens[i + 1:i + 2] == ["-m"] and len(tokens) > i + 2:
      return tokens[i + 2], tokens[i + 3:]
  return None


@functools.lru_cache(maxsize=None)
def help_text(module: str) -> str:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  return proc.stdout + proc.stderr


def _flag_listed(flag: str, text: str) -> bool:
  name = flag[2:]
  return bool(re.search(r"--(\[no\])?" + re.escape(name) + r"\b", text))


def config_problems(args) -> list:
  """Problems of `--config=FILE[:ARG]` and its `--config.X=V` overrides (parsed for real)."""
  config = [a for a in args if a.startswith("--config=")]
  if not config:
    return []
  overrides = [a for a in args if a.startswith("--config.")]
  argv = ["prog", config[0]] + overrides
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  try:
    values(argv)
  except Exception as e:  # pylint: disable=broad-except  (any parse failure is the finding)
    return [f"{config[0]} {' '.join(overrides)}: {type(e).__name__}: {e}"]
  return []


def command_problems(tokens, root=ROOT, help_of=help_text) -> list:
  problems = []
  scripts = [t for t in tokens if t.endswith((".py", ".sh")) and "/" in t and "=" not in t]
  for script in scripts:
    if not (root / script).exists():
      problems.append(f"{' '.join(tokens)}: no file {script}")
  found = _module_and_args(tokens)
  if found is None:
    return problems
  module, args = found
  if module.split(".")[0] in THIRD_PARTY:
    return problems
  if importlib.util.find_spec(module) is None:
    return problems + [f"{' '.join(tokens)}: no module {module}"]
  text = help_of(module)
  for arg in args:
    if arg.startswith("--") and not arg.startswith("--config."):
      flag = arg.split("=", 1)[0]
      if not _flag_listed(flag, text):
        problems.append(f"{' '.join(tokens)}: {module} takes no {flag}")
  return problems + config_problems(args)


# --- paths --------------------------------------------------------------------------


def _expand_braces(path: str) -> list:
  m = re.search(r"\{([^{}]*)\}", path)
  if not m:
    return [path]
  return [p for alt in m.group(1).split(",")
          for p in _expand_braces(path[:m.start()] + alt + path[m.end():])]


def path_problems(text: str, page_dir: pathlib.Path, root=ROOT) -> list:
  problems = []
  for link in re.findall(r"\]\(([^)\s]+)\)", text):
    if re.match(r"[a-z]+://", link) or link.startswith("#"):
      continue
    target = (page_dir / link.split("#")[0]).resolve()
    if not target.exists():
      problems.append(f"link {link}: no such file")
  for span in re.findall(r"`([^`\s]+)`", text):
    span = span.split(":")[0].rstrip(".,")
    if span.startswith(PATH_PREFIXES) and not any(c in span for c in "*$<>"):
      for path in _expand_braces(span):
        if not (root / path).exists():
          problems.append(f"path {path}: no such file or folder")
  return problems


# --- the tests ----------------------------------------------------------------------


def test_quickstarts_run(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ns = run_python_blocks((ROOT / "README.md").read_text(), "README.md", {"__name__": "readme"})
  summary = ns["summary"]
  assert set(summary) == {"layers_0/kernel", "layers_2/kernel"}
  assert all(s.frozen == s.total and s.distinct_values <= 17 and s.bits == 5
             for s in summary.values())
  assert int(ns["state"].step) == 4  # the NNX loop's state, every portion applied
  nnx_summary = ns["inq_nnx"].verify(ns["model"], ns["state"])
  assert set(nnx_summary) == {"hidden/kernel", "out/kernel"}
  assert all(s.frozen == s.total for s in nnx_summary.values())


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "README.md"], ids=page_id)
def test_python_blocks_of_the_docs_run(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  run_python_blocks(page.read_text(), str(page), {"__name__": "docs"})


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_excerpts_are_what_the_examples_run(page):
  assert excerpt_problems(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_commands_parse(page):
  problems = []
  for tokens in shell_commands(page.read_text()):
    problems += command_problems(tokens)
  assert problems == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_paths_exist(page):
  assert path_problems(page.read_text(), page.parent) == []


def test_layout_names_every_module():
  text = (ROOT / "docs" / "layout.md").read_text()
  modules = sorted(str(p.relative_to(ROOT)) for folder in ("inq_jax", "experiments", "examples")
                   for p in (ROOT / folder).rglob("*.py"))
  listed = {m for m in modules if f"`{m}`" in text or
            (os.path.dirname(m) + "/" in text and m.startswith("experiments/configs/")) or
            (m.startswith("experiments/benchmarks/") and os.path.basename(m)[:-3] in text)}
  assert [m for m in modules if m not in listed] == []


def test_the_checks_catch_planted_mistakes(tmp_path):
  stale = ("```sh\n.venv/bin/python -m experiments.main --config=experiments/configs/smoke.py "
           "--workdir=/tmp/x --config.inq.epochs_per_phase=2\n```\n")
  bad_flag = "```sh\n.venv/bin/python -m inq_jax.verify_file model.inq --sha512\n```\n"
  bad_module = "```sh\n.venv/bin/python -m experiments.tools.nope --x=1\n```\n"
  inside_gcloud = ('```sh\ngcloud compute tpus tpu-vm ssh t --command="cd x && .venv/bin/python '
                   '-m experiments.main --config=experiments/configs/smoke.py '
                   '--config.nope=1"\n```\n')
  for text, want in ((stale, "epochs_per_phase"), (bad_flag, "takes no --sha512"),
                     (bad_module, "no module experiments.tools.nope"),
                     (inside_gcloud, "nope")):
    problems = [p for t in shell_commands(text) for p in command_problems(t)]
    assert any(want in p for p in problems), (text, problems)
  assert path_problems("see `experiments/configs/nope.py` and [x](missing.md)", ROOT) == [
      "link missing.md: no such file", "path experiments/configs/nope.py: no such file or folder"]
  assert excerpt_problems("<!-- excerpt: examples/nnx_loop.py -->\n```python\nnot in it\n```\n")
  with pytest.raises(NameError):
    run_python_blocks("```python\nundefined_name\n```\n", "planted", {})
