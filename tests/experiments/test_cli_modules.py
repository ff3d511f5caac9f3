"""Every experiment command can be imported next to the others (one pytest process)."""

import importlib
import subprocess
import sys

import pytest

CLI_MODULES = ("experiments.main", "experiments.tools.evaluate", "experiments.tools.export",
               "experiments.tools.shift_check", "experiments.study.sweep")


def test_all_commands_import_together():
  for name in CLI_MODULES:
    importlib.import_module(name)  # flags are defined only under __main__


@pytest.mark.parametrize("name", CLI_MODULES)
def test_help_lists_its_flags(name):
  # absl's --helpshort exits 1 after printing the module's own flags.
  out = subprocess.run([sys.executable, "-m", name, "--helpshort"], capture_output=True,
                       text=True, check=False)
  assert name.replace(".", "/") + ".py:" in out.stdout, out.stdout + out.stderr
  assert "--config" in out.stdout or "--workdir" in out.stdout, out.stdout
