"""Which direct dependencies scripts/check_upgrades.sh could not give their newest release, with pip's reason.

    python scripts/newest_releases.py NAME...   # with the venv's python, after its `pip install --upgrade NAME...`

`pip install --upgrade` settles quietly for an older release when the newest does not install (it needs a release
the registry does not have, a pip constraint caps it, another package excludes it). For each name: the newest
release the registry serves for this Python (`pip index versions`, which ignores pip's constraints: a cap is one
of the reasons to report), against the installed one; where they differ, a dry run of installing that release
beside the others gives pip's reason, condensed to one line. Prints one line per such package, or "none", and
exits 1 if there is any.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

NO_MATCH = re.compile(r"satisfies the requirement (.+?)(?: \(from ([^()]+)\))? \(from versions: ([^)]*)\)")


def canonical(name: str) -> str:
    """PEP 503 normalised name: 'Pillow' and 'pillow', 'huggingface_hub' and 'huggingface-hub' are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """The release without its local label: torch 2.14.1+cpu is the release 2.14.1."""
    return version.split("+")[0]


def parse_newest(output: str):
    """The newest version in `pip index versions NAME`'s output, whose first line is 'NAME (VERSION)'; else None."""
    match = re.search(r"^\S+ \(([^()\s]+)\)$", output, re.M)
    return match.group(1) if match else None


def constraint_files(config: str) -> list[str]:
    """The constraint files in `pip config list`'s output (global.constraint='...', :env:.constraint='...')."""
    return [path for value in re.findall(r"^\S*\.constraint='([^']*)'$", config, re.M) for path in value.split()]


def fold(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def reason(output: str, name: str, version: str, constraints=()) -> str:
    """pip's reason in one line, from the output of a failed `pip install --dry-run NAME==VERSION <the others>`."""
    lines = [line.strip() for line in output.splitlines()]
    if "The conflict is caused by:" in lines:  # ResolutionImpossible: the requirements that exclude each other
        causes = []
        for line in lines[lines.index("The conflict is caused by:") + 1:]:
            if not line:
                break
            capped = re.fullmatch(r"The user requested \(constraint\) (.+)", line)
            if capped:
                where = f", in {' '.join(constraints)}" if constraints else ""
                causes.append(f"a pip constraint caps {capped.group(1)}{where}")
            elif not line.startswith("The user requested "):  # our own requests: the release tried, the others
                causes.append(line)
        if causes:
            return fold("; ".join(causes))
    match = NO_MATCH.search(output)
    if match:  # a requirement no release in the registry meets (pip prints the releases it has, oldest first)
        wanted, parent, releases = match.groups()
        dependency = re.match(r"[A-Za-z0-9._-]+", wanted).group(0)
        who = f"{name} {version}" if parent and canonical(parent) == canonical(name) else parent
        needs = f"{who} depends on {wanted}" if who else f"no release matches {wanted}"
        releases = [release for release in releases.split(", ") if release and release != "none"]
        newest = f"the newest {dependency} is {releases[-1]}" if releases else f"the registry has no {dependency}"
        return fold(f"{needs}; {newest}")
    errors = [line[len("ERROR: "):] for line in lines if line.startswith("ERROR: ")]
    return fold(errors[-1] if errors else next((line for line in reversed(lines) if line), "no output"))


def changes(report: dict, installed: dict, name: str) -> list[str]:
    """What else a successful dry run (pip's --report) would change: ['numpy 2.4.6 -> 2.3.0', ...]."""
    found = []
    for item in report.get("install", []):
        other, version = item["metadata"]["name"], item["metadata"]["version"]
        if canonical(other) != canonical(name) and installed.get(canonical(other)) != version:
            found.append(f"{other} {installed.get(canonical(other), '(none)')} -> {version}")
    return found


def held_back(names, newest, installed, why) -> list[str]:
    """One line per name whose newest release is not the installed one; why(name, newest) says pip's reason."""
    lines = []
    for name in names:
        have, best = installed.get(canonical(name)), newest[name]
        if best is None:
            lines.append(f"{name}: its newest release is unknown ({have or 'nothing'} installed): pip index versions "
                         f"found none")
        elif have is None or public(have) != public(best):
            lines.append(f"{name}: newest {best} did not install ({have or 'nothing'} installed): "
                         f"{why(name, best)} (pip)")
    return lines


# ------------------------------------------------------------------------------------------------ pip itself
def pip(*args) -> tuple[str, int]:
    """The venv's pip (this interpreter's): its output (stdout and stderr together) and its exit status."""
    result = subprocess.run([sys.executable, "-m", "pip", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    return result.stdout, result.returncode


def installed_versions() -> dict:
    dists = metadata.distributions()
    return {canonical(dist.metadata["Name"]): dist.version for dist in dists if dist.metadata["Name"]}


def main(names) -> int:
    with ThreadPoolExecutor(8) as pool:  # one registry query per name: a few seconds each
        newest = dict(zip(names, pool.map(lambda name: parse_newest(pip("index", "versions", name)[0]), names)))
    installed = installed_versions()
    constraints = constraint_files(pip("config", "list")[0])

    def why(name, version):
        others = [other for other in names if other != name]
        with tempfile.TemporaryDirectory() as folder:
            report_path = os.path.join(folder, "report.json")
            output, status = pip("install", "--dry-run", "--report", report_path, f"{name}=={version}", *others)
            if status != 0:
                return reason(output, name, version, constraints)
            with open(report_path) as f:
                also = changes(json.load(f), installed, name)
        if also:
            return f"a dry run installs it only by also changing {', '.join(also)}"
        return "a dry run installs it beside the others: `pip install --upgrade` chose otherwise"

    lines = held_back(names, newest, installed, why)
    print("\n".join(lines) or "none")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
