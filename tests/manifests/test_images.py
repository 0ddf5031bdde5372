"""The control-plane image's Dockerfile and the build context (.dockerignore), checked
statically: no container engine runs here to build it."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from typing import Any

from tests.manifests import manifest_support as support

DOCKERFILE = support.REPO / "images" / "control-plane" / "Dockerfile"
DOCKERIGNORE = support.REPO / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def ignored(path: str) -> bool:
    patterns = [
        p.strip()
        for p in DOCKERIGNORE.read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, pattern.removeprefix("**/")) or fnmatch.fnmatch(prefix, pattern)
        for pattern in patterns
        for prefix in prefixes
    )


def test_base_image_is_pinned_and_final_user_is_not_root() -> None:
    steps = instructions()
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    for kind, rest in steps:
        if kind == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
            assert support.image_violations(image) == [], image
    users = [rest for kind, rest in steps if kind == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric: runAsNonRoot can verify it
    last_from = max(i for i, (kind, _) in enumerate(steps) if kind == "FROM")
    assert any(kind == "USER" for kind, _ in steps[last_from:])


def test_copied_sources_exist_and_reach_the_build_context() -> None:
    copies = [rest for kind, rest in instructions() if kind == "COPY" and "--from" not in rest]
    assert copies
    for rest in copies:
        *sources, _ = rest.split()
        for source in sources:
            assert (support.REPO / source).exists(), source
            assert not ignored(source), f"{source} is excluded by .dockerignore"


def test_context_leaves_out_local_state() -> None:
    for path in (".git/config", ".venv/bin/python", "tests/conftest.py", ".env", "a/b/x.pem"):
        assert ignored(path), path
    assert not ignored("api/whisperx_api/schema.py")


def test_image_installs_the_control_plane_without_the_ml_stack() -> None:
    runs = " ".join(rest for kind, rest in instructions() if kind == "RUN")
    assert "pip install ." in runs
    assert "[runner]" not in runs and "torch" not in runs and "whisperx==" not in runs
    project: dict[str, Any] = tomllib.loads((support.REPO / "pyproject.toml").read_text())
    scripts = project["project"]["scripts"]
    cmd = [rest for kind, rest in instructions() if kind == "CMD"][-1]
    assert cmd.strip('[]"') in scripts
    # The commands the manifests run exist in this image.
    for root in support.OVERLAYS:
        for obj, spec in support.workloads(support.render(support.OVERLAYS[root])):
            for container in spec["containers"]:
                if container["image"].startswith("whisperx/control-plane:"):
                    assert container["command"][0] in scripts, support.ident(obj)
