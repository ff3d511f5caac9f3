"""Errors a user can fix, and how the commands report them.

A `Reported` error's message is the whole story (the config key and its value,
or the path, and what to do), so the commands (`experiments.main`, the sweep,
`experiments.tools.*`) print it as one short message and exit, without a
traceback: status 2 for a mistake in the command (`UserError`), 1 for the
machine's (`OutOfSpaceError`, and Cloud Storage unreachable: missing
credentials or no network). Every other exception is a bug and keeps its
traceback. The classes also derive from the builtin a caller would expect
(ValueError, FileNotFoundError, OSError), so library callers can catch those.
"""

from __future__ import annotations

import errno
import re
import sys
import traceback
from typing import Any, Callable, Optional

from absl import app
from absl import flags

# What a bug raises, as opposed to a file system, a network or a reader of
# damaged data failing (ValueError, OSError, tensorstore's bare Exception): a
# bug keeps its traceback.
BUGS = (TypeError, AttributeError, KeyError, NameError, AssertionError)

# A write that failed for want of space: the OS's errno, or tensorstore's
# wording of it (orbax writes through tensorstore, whose errors are ValueErrors
# carrying "[os_error_code='28']" or the strerror text).
_OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_OUT_OF_SPACE_TEXT = re.compile(
    r"No space left on device|Disk quota exceeded|File too large|"
    r"os_error_code='(%s)'" % "|".join(str(e) for e in _OUT_OF_SPACE_ERRNOS))


class Reported(Exception):
  """An error whose message says everything: the commands print it without a traceback."""
  exit_code = 1


class UserError(Reported):
  """A mistake in what the user asked for (a setting, a path, a workdir): exit status 2."""
  exit_code = 2


def show(value: Any) -> str:
  """`value` as the message shows it: short, and a float the way Python reads it back."""
  if hasattr(value, "to_dict"):  # a ConfigDict: its repr is YAML over several lines
    value = value.to_dict()
  text = repr(value)
  return text if len(text) <= 200 else text[:197] + "..."


class ConfigError(UserError, ValueError):
  """A config value that is refused: names the key, the value and the fix.

  str(): "KEY must be WHAT, got VALUE; FIX" (or "KEY: PROBLEM; FIX" when the
  problem text already shows the value, e.g. a library's own message).
  """

  def __init__(self, key: str, value: Any, problem: str, fix: str = "", *,
               shows_value: bool = False):
    self.key, self.value, self.problem, self.fix = key, value, problem, fix
    if not shows_value:
      text = f"{key} {problem}, got {show(value)}"
    else:  # the problem already shows the value, and may start with the key itself
      text = problem if problem.startswith(key) else f"{key}: {problem}"
    super().__init__(text + (f"; {fix}" if fix else ""))


class InputNotFoundError(UserError, FileNotFoundError):
  """A path the user named (a config value, a flag) does not exist."""

  def __str__(self):
    return str(self.args[0]) if self.args else ""


class InputError(UserError, ValueError):
  """A file or directory the user named (a flag) exists but cannot be used."""


class WorkdirError(UserError, ValueError):
  """The workdir cannot be used as asked: another config's, another version's, unwritable."""


class WorkdirInUseError(UserError, RuntimeError):
  """A live run holds the workdir's lock (the message names it and what to do)."""


class OutOfSpaceError(Reported, OSError):
  """A write failed for want of space; the message names what was being written.

  Exit status 1: nothing in the command was wrong, and rerunning the same
  command once there is space resumes from the last complete checkpoint.
  """

  def __init__(self, message: str):
    super().__init__(errno.ENOSPC, message)
    self.message = message

  def __str__(self):
    return self.message


def is_out_of_space(e: BaseException) -> bool:
  """Whether `e` (or what it was raised from) is a write refused for want of space."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _OUT_OF_SPACE_ERRNOS:
      return True
    if _OUT_OF_SPACE_TEXT.search(str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


def out_of_space(what: str, e: BaseException) -> OutOfSpaceError:
  """The one-line error for a write of `what` that ran out of space (`e`: what failed)."""
  reason = "no space left on the device"
  text = str(e)
  if "File too large" in text or getattr(e, "errno", None) == errno.EFBIG:
    reason = "the file size limit was reached"
  elif "quota" in text.lower() or getattr(e, "errno", None) == errno.EDQUOT:
    reason = "the disk quota is exhausted"
  return OutOfSpaceError(f"out of space while writing {what}: {reason}. Earlier "
                         "checkpoints are intact: free some space and rerun the same "
                         "command to resume")


# ------------------------------------------------------------------ commands


def _fail(prog: str, message: str, code: int):
  print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _from_config_flags(e: BaseException) -> bool:
  """Whether `e` was raised while ml_collections applied a --config.KEY override."""
  return any("ml_collections" in frame.filename
             for frame in traceback.extract_tb(e.__traceback__))


def _unknown_key_message(e: BaseException, argv) -> str:
  """'--config.X=V: the config has no key ...' for an override of a key the config lacks."""
  # ml_collections nests the KeyError's repr in the AttributeError: unescape it.
  text = str(e).replace("\\'", "'").replace("\\n", " ")
  match = re.search(r"'([^'\s]+)'", text)
  name = match.group(1) if match else "?"
  hint = re.search(r'Did you mean "([^"]+)"', text)
  flag = next((a for a in argv if a.startswith("--config.") and
               name in a.split("=", 1)[0][len("--config."):].split(".")), None)
  return (f"{flag or '--config.' + name}: the config has no key {name!r}"
          + (f"; did you mean {hint.group(1)!r}?" if hint else "")
          + " (--helpfull lists every --config.KEY)")


def parse_flags(argv, prog: str):
  """absl's flag parsing, with a short message and exit status 2 for a bad command line.

  Bad flag values and missing flags (absl's own errors), an override of a config
  key that does not exist, and a --config file that cannot be read are the
  user's to fix; an exception raised by the code of a config file that does
  load is a bug in that file and keeps its traceback.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(prog, f"{e} (--helpshort lists the flags)", 2)
  except (AttributeError, KeyError) as e:
    if not _from_config_flags(e):
      raise
    _fail(prog, _unknown_key_message(e, argv), 2)
  except OSError as e:
    if "Failed loading config file" not in str(e) and not _from_config_flags(e):
      raise
    _fail(prog, _config_file_message(e), 2)


def _config_file_message(e: OSError) -> str:
  text = str(e)
  reasons = [line.strip() for line in text.splitlines() if line.strip().startswith("[Errno")]
  return f"cannot load the --config file: {reasons[-1] if reasons else text}"


def _reported_in(e: BaseException) -> Optional[Reported]:
  """The first `Reported` error among `e` and what it was raised during."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, Reported):
      return e
    seen.add(id(e))
    e = e.__context__
  return None


def guard(main: Callable, prog: str) -> Callable:
  """`main` with `Reported` errors (and writes out of space) printed as one message."""
  def wrapped(argv):
    try:
      return main(argv)
    except Reported as e:
      _fail(prog, str(e), e.exit_code)
    except OSError as e:
      if "Failed loading config file" in str(e):  # --config read when first used
        _fail(prog, _config_file_message(e), 2)
      if _from_cloud_client(e):
        _fail(prog, _cloud_message(e), 1)
      if not is_out_of_space(e):
        raise
      # A full disk also fails the clean-up after the write that reported it
      # (closing files in a `finally`): report that first, named, error.
      first = _reported_in(e)
      if first is not None:
        _fail(prog, str(first), first.exit_code)
      _fail(prog, f"out of space: {e}. Free some space and rerun the same command to "
            "resume from the last checkpoint", 1)
    except Exception as e:  # pylint: disable=broad-except
      if not _from_cloud_client(e):
        raise
      _fail(prog, _cloud_message(e), 1)
  return wrapped


# Errors of the clients that reach gs:// (missing credentials, no network): the
# machine's set-up, not a bug; they keep no traceback either.
_CLOUD_MODULES = ("google.auth", "aiohttp", "gcsfs")


def _from_cloud_client(e: BaseException) -> bool:
  return type(e).__module__.startswith(_CLOUD_MODULES)


def _cloud_message(e: BaseException) -> str:
  text = str(e).splitlines()[0][:300] if str(e) else ""
  return (f"cannot reach Cloud Storage ({type(e).__name__}: {text}). Check the network and "
          "the credentials: `gcloud auth application-default login` on a workstation; on a "
          "TPU or GCE VM its service account needs access to the bucket")


def run(main: Callable, prog: str, argv: Optional[list] = None) -> None:
  """absl's `app.run(main)` with the user's mistakes reported in one message (see module doc)."""
  app.run(guard(main, prog), argv=argv,
          flags_parser=lambda args: parse_flags(args, prog))
