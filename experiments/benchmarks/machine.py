"""What machine a benchmark ran on, for the JSON line it prints."""

import os


def cpu_name() -> str:
  """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown"


def load_average() -> list:
  """The 1/5/15-minute load average, rounded: figures from a shared machine need it."""
  return [round(x, 2) for x in os.getloadavg()]
