"""The README's Flax example runs as written (so it cannot rot)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def section_code(title: str) -> str:
  text = README.read_text()
  section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  assert blocks, f"no python block under '## {title}'"
  return "\n".join(blocks)


def test_flax_example_runs(capsys):
  namespace = {"__name__": "readme_example"}
  exec(compile(section_code("Use inq_jax in your Flax project"), str(README), "exec"),
       namespace)
  summary, state = namespace["summary"], namespace["state"]
  assert set(summary) == {"Dense_0/kernel", "Dense_1/kernel"}
  assert all(s.frozen == s.total for s in summary.values())
  assert all(s.distinct_values <= 17 for s in summary.values())
  assert int(state.step) == 4
  assert "Dense_1/kernel: 2048/2048 quantized" in capsys.readouterr().out
