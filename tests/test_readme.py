"""The README's notebook example runs as written (on a smaller data config)."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_readme_notebook_example_runs():
  text = open(os.path.join(ROOT, "README.md")).read()
  (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
  code = code.replace('"n3000_m600_s0"', '"n600_m200_s0"')
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert int(scope["state"]["step"]) == 200
  counts = scope["measurements"]["task_count"]
  assert counts.tolist() == [50.0, 50.0]  # K = T = 2: both tasks every step
