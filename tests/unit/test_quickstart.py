"""The README's quickstart stays two commands, and CI runs the same test command."""

from __future__ import annotations

import importlib.util
import re

from tests.conftest import REPO


def _readme_commands() -> list[str]:
    spec = importlib.util.spec_from_file_location("time_quickstart",
                                                  REPO / "scripts" / "time_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.readme_commands((REPO / "README.md").read_text(encoding="utf-8"))


def test_quickstart_is_two_commands_and_ci_runs_its_test_command():
    install_and_demo, tests = _readme_commands()
    # 1: a virtual environment, torch before the package, then the demo (no download).
    steps = install_and_demo.split(" && ")
    assert steps[0] == "python3 -m venv .venv" and steps[1] == ". .venv/bin/activate"
    assert steps.index("pip install torch==2.13.0") < steps.index('pip install -e ".[test]"')
    assert steps[-1] == "tunesmith demo"
    # 2: the tests, with the virtual environment's python (works in a new shell too).
    assert tests == ".venv/bin/python -m pytest tests -q"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    commands = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.startswith("#")]
    assert commands[-1] == tests
    assert "python3 -m venv .venv" in commands
    torch_line = next(i for i, c in enumerate(commands) if '"torch==2.13.0"' in c)
    package_line = next(i for i, c in enumerate(commands) if '-e ".[test]"' in c)
    assert torch_line < package_line


def test_readme_pins_the_torch_it_tells_cpu_users_to_fetch():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    cpu = re.search(r"pip install torch==([\d.]+) --index-url https://download\.pytorch\.org/whl/cpu",
                    readme)
    assert cpu is not None and f"torch=={cpu.group(1)}" in _readme_commands()[0]
