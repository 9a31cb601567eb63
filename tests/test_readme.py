"""The README's Python API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("### Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # its output_dir is relative
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.run_dir == Path("runs/api-example") and (tmp_path / "runs/api-example/metrics.jsonl").is_file()
    assert len(result.metrics) == 2 and result.metrics[-1]["val_ppl"] > 1
    assert str(result.metrics[-1]["val_ppl"]) in capsys.readouterr().out
