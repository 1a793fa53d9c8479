"""Time the README's two quickstart commands as a newcomer runs them: a fresh clone, a fresh
virtual environment, no pip cache, nothing from the caller's PYTHONPATH or thread settings.

    python3 scripts/time_quickstart.py              # clone of HEAD (committed work only)
    python3 scripts/time_quickstart.py --no-shared  # as on a machine without ../shared
    python3 scripts/time_quickstart.py --only 1     # install and demo, not the tests

The commands are read from README.md's Quickstart block, so what is timed is what the README
says. Each `&&` step of the first command is timed too (venv, torch, the package, the demo).
At the end it prints wall, user and system seconds per command, the load average before and
after (a busy machine inflates wall time), and the versions, ready for the README's table.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "@@quickstart-time"
# The caller's settings that would make the run not fresh.
DROP_ENV = ("PYTHONPATH", "VIRTUAL_ENV", "OMP_", "RAYON_", "TOKENIZERS_", "HF_DATASETS_DISABLE",
            "HF_HUB_DISABLE", "PIP_REQUIRE_VIRTUALENV")


def readme_commands(readme: str) -> list[str]:
    """The commands of the first ```bash block under '## Quickstart', trailing comments off."""
    section = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    if block is None:
        raise ValueError("README.md: no ```bash block under '## Quickstart'")
    lines = [re.sub(r"\s+#.*$", "", ln).strip() for ln in block.group(1).splitlines()]
    return [ln for ln in lines if ln]


def timed_script(commands: list[str]) -> str:
    """One bash session (as in a terminal: the first command's `activate` lasts), each `&&`
    step of each command timed by bash's `time`, which counts the children's CPU time too."""
    out = ["set -e"]
    for ci, cmd in enumerate(commands, 1):
        for si, step in enumerate(cmd.split(" && "), 1):
            out.append(f"TIMEFORMAT='{MARK} {ci} {si} %R %U %S'")
            out.append(f"time {{ {step} ; }}")
    return "\n".join(out) + "\n"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-shared", action="store_true", help="no ../shared next to the clone")
    ap.add_argument("--keep", action="store_true", help="keep the clone and its .venv")
    ap.add_argument("--log", default=None, help="also write the full output here")
    ap.add_argument("--only", type=int, default=None, help="run only the first N commands")
    args = ap.parse_args()
    commands = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))[: args.only]
    root = Path(tempfile.mkdtemp(prefix="tunesmith-quickstart-"))
    clone = root / "tunesmith"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    shared = REPO.parent / "shared"
    if not args.no_shared and shared.is_dir():
        (root / "shared").symlink_to(shared)  # the tests look for ../shared
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROP_ENV)}
    env["PIP_NO_CACHE_DIR"] = "1"
    print(f"fresh clone of {REPO} (HEAD {_head()}) in {clone}; commands:", *commands, sep="\n  ")
    started, load_before = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), _load()
    proc = subprocess.Popen(["bash", "-c", timed_script(commands)], cwd=clone, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, times = [], []
    for line in proc.stdout:
        found = re.search(MARK + r" (\d+) (\d+) ([\d.]+) ([\d.]+) ([\d.]+)", line)
        if found:  # bash prints it after the step's last output, which may lack a newline
            times.append(list(found.groups()))
            line = line[: found.start()] + line[found.end():].lstrip(" ")
        if line.strip():
            sys.stdout.write(line)
            log.append(line)
    code = proc.wait()
    if args.log:
        Path(args.log).write_text("".join(log))
    _report(commands, times, log, clone, started, load_before, code)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return code


def _head() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()


def _report(commands, times, log, clone, started, load_before, code) -> None:
    print(f"\n== quickstart timing, {started}, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), exit code {code}")
    print(f"load average (1/5/15 min) before: {load_before}; after: {_load()}")
    for ci, cmd in enumerate(commands, 1):
        rows = [t for t in times if t[0] == str(ci)]
        wall, user, sys_ = (sum(float(t[k]) for t in rows) for k in (2, 3, 4))
        print(f"command {ci}: wall {wall:.0f} s, user {user:.0f} s, sys {sys_:.0f} s  ({cmd})")
        steps = cmd.split(" && ")
        for t in rows if len(steps) > 1 else []:
            print(f"    {float(t[2]):7.1f} s wall {float(t[3]):7.1f} s user  {steps[int(t[1]) - 1]}")
    for line in log:  # the demo's result line and pytest's summary line
        if line.startswith("eval perplexity:") or re.search(r"\d+ passed", line):
            print(line.rstrip())
    python = clone / ".venv" / "bin" / "python"
    if python.exists():
        code = ("import sys, torch, transformers; print('python', sys.version.split()[0], "
                "'torch', torch.__version__, 'transformers', transformers.__version__)")
        versions = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                                  check=False)
        print(versions.stdout.strip())


if __name__ == "__main__":
    sys.exit(main())
