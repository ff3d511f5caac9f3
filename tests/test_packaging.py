"""The wheel: `inq_jax` only, Apache-2.0 LICENSE, core dependencies jax/numpy/optax.

Builds the wheel from a copy of the source (so nothing is written into the
checkout), checks its contents and METADATA, installs it with its core
dependencies only into one fresh venv (from PyPI; pip's cache makes reruns
quick) and checks there that the library works end to end while the
experiments' dependencies (flax, TFDS, orbax) are absent. Prints the size of
that install. Needs PyPI; it fails, never skips, without it.
"""

import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

pytestmark = pytest.mark.packaging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = {"jax", "numpy", "optax"}
ABSENT = ("flax", "tensorflow_datasets", "orbax", "experiments")

ROUND_TRIP = textwrap.dedent("""
    import importlib, json, os, sys
    import numpy as np
    import jax, jax.numpy as jnp, optax
    import inq_jax.quantize as inq, inq_jax.optim, inq_jax.export

    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(0, 0.1, (8, 4)), jnp.float32),
                        "bias": jnp.zeros((4,), jnp.float32)}}
    state = inq.init(params, inq.INQConfig(bits=5))
    for _ in state.config.portions:
      params, state = inq.advance(params, state)
      tx = optax.chain(optax.sgd(0.1), inq_jax.optim.elementwise_freeze(state.masks))
      opt = tx.init(params)
      grads = jax.tree.map(jnp.ones_like, params)
      updates, opt = tx.update(grads, opt, params)
      new = optax.apply_updates(params, updates)
      m = np.asarray(state.masks["dense"]["kernel"])
      k0, k1 = np.asarray(params["dense"]["kernel"]), np.asarray(new["dense"]["kernel"])
      assert (k0[m] == k1[m]).all() and (k0[~m] != k1[~m]).all(), "freeze"
      params = new
    inq.verify(params, state)
    path = os.path.join(sys.argv[1], "tiny.inq")
    stats = inq_jax.export.save(path, params, state)
    back = inq_jax.export.load(path)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
      assert np.array_equal(np.asarray(a), np.asarray(b)), "export round trip"
    absent = {}
    for name in sys.argv[2:]:
      try:
        importlib.import_module(name)
        absent[name] = False
      except ImportError:
        absent[name] = True
    print(json.dumps({"ratio": stats["ratio"], "absent": absent,
                      "inq_jax": os.path.dirname(inq_jax.__file__)}))
""")


def run(cmd, **kw):
  result = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
  if result.returncode:
    shown = " ".join(a if len(a) < 200 else "<script>" for a in map(str, cmd))
    pytest.fail(f"{shown} exited {result.returncode}\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}", pytrace=False)
  return result.stdout


def clean_env():
  env = dict(os.environ)
  for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP",
              # The suite's compilation cache (tests/conftest.py): a user's
              # fresh install has none.
              "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
    env.pop(var, None)
  return env


@pytest.fixture(scope="module")
def wheel(inq_wheel):
  return inq_wheel


def test_wheel_installs_and_runs_with_core_dependencies_only(wheel, tmp_path, capsys):
  # ------------------------------------------------------------ the wheel itself
  with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    metadata = email.parser.Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())
    licenses = [n for n in names if n.startswith(dist_info + "/") and
                os.path.basename(n) == "LICENSE"]
    assert licenses, f"no LICENSE in {dist_info}: {names}"
    license_text = zf.read(licenses[0]).decode()
  assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
  assert "Copyright 2026 The inq_jax Authors" in license_text

  top = {n.split("/")[0] for n in names} - {dist_info}
  assert top == {"inq_jax"}, f"the wheel must hold inq_jax only, has {sorted(top)}"
  assert not [n for n in names if "experiments" in n.split("/")], names
  sources = {f"inq_jax/{f}" for f in os.listdir(os.path.join(ROOT, "inq_jax")) if f.endswith(".py")}
  assert sources <= set(names), f"missing from the wheel: {sorted(sources - set(names))}"

  requires = metadata.get_all("Requires-Dist") or []
  core = {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() for r in requires if "extra ==" not in r}
  assert core == CORE, f"core Requires-Dist {sorted(core)} != {sorted(CORE)}: {requires}"
  assert {"experiments", "test"} <= set(metadata.get_all("Provides-Extra") or [])

  # ------------------------------------------- a fresh venv with the core only
  venv = tmp_path / "venv"
  try:
    env = clean_env()
    run([sys.executable, "-m", "venv", str(venv)], env=env, timeout=300)
    py, pip = str(venv / "bin" / "python"), [str(venv / "bin" / "python"), "-m", "pip"]
    run(pip + ["install", "-q", wheel], env=env, cwd=tmp_path, timeout=900)

    work = tmp_path / "work"
    work.mkdir()
    out = run([py, "-c", ROUND_TRIP, str(work), *ABSENT], env=env, cwd=work, timeout=600)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["inq_jax"].startswith(str(venv)), report  # the wheel, not the checkout
    assert all(report["absent"].values()), (
        f"importable without the experiments extra: "
        f"{[k for k, v in report['absent'].items() if not v]}")

    # ------------------------------------------------------------------ its size
    site = run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env)
    du_mb = int(run(["du", "-sm", site.strip()]).split()[0])
    dists = [line.split("==")[0] for line in
             run(pip + ["list", "--format=freeze", "--exclude-editable"], env=env).split()]
    with capsys.disabled():
      installed = sorted(set(dists) - {"pip", "setuptools"})  # those come with the venv
      print(f"\n[packaging] core install (pip install <inq_jax wheel>): {du_mb} MB in "
            f"site-packages (pip and setuptools included), {len(installed)} distributions "
            f"installed: {', '.join(installed)}")
  finally:
    shutil.rmtree(venv, ignore_errors=True)  # ~0.6 GB; pytest keeps 3 basetemps
