"""The images' Containerfiles and the build context (.containerignore), checked
statically; scripts/build-images.sh builds and runs them where podman is installed."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.manifests import manifest_support as support

IMAGES = support.REPO / "images"
CONTROL_PLANE = IMAGES / "control-plane" / "Containerfile"
RUNNER = IMAGES / "runner" / "Containerfile"
REDIS = IMAGES / "redis" / "Containerfile"
CONTAINERFILES = [CONTROL_PLANE, RUNNER, REDIS]
CONTAINERIGNORE = support.REPO / ".containerignore"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions by name (unnamed stages by their position)."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for kind, rest in instructions(path):
        if kind == "FROM":
            words = rest.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else str(len(out))
            current = out.setdefault(name, [])
        if current is not None:
            current.append((kind, rest))
    return out


def final_user(path: Path, stage: str | None = None) -> str:
    """The USER a stage runs as (the last stage by default), inherited from the stage it
    starts from when it sets none."""
    by_stage = stages(path)
    steps = by_stage[stage] if stage else list(by_stage.values())[-1]
    users = [rest for kind, rest in steps if kind == "USER"]
    if users:
        return users[-1]
    args = dict(a.split("=", 1) for kind, a in instructions(path) if kind == "ARG" and "=" in a)
    parent = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], steps[0][1].split()[0])
    assert parent in by_stage, "the image must not run as root"
    return final_user(path, parent)


def ignored(path: str) -> bool:
    """As the builders read .containerignore: the last pattern that matches decides, and
    a `!` pattern lets a path back in."""
    patterns = [
        p.strip()
        for p in CONTAINERIGNORE.read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        if any(
            fnmatch.fnmatch(prefix, pattern.removeprefix("**/")) or fnmatch.fnmatch(prefix, pattern)
            for prefix in prefixes
        ):
            result = not negated
    return result


@pytest.mark.parametrize("path", CONTAINERFILES, ids=lambda p: p.parent.name)
def test_base_image_is_pinned_and_final_user_is_not_root(path: Path) -> None:
    steps = instructions(path)
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    named: set[str] = set()
    for kind, rest in steps:
        if kind == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            if image not in named:
                assert support.image_violations(image) == [], image
            if len(words) > 2:
                named.add(words[2])
    uid = final_user(path).split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric: runAsNonRoot can verify it


def test_images_run_as_the_users_the_manifests_and_jobs_name() -> None:
    def user(path: Path, stage: str | None = None) -> int:
        return int(final_user(path, stage).split(":")[0])

    expected = {"whisperx/control-plane": user(CONTROL_PLANE), "whisperx/redis": user(REDIS)}
    assert user(RUNNER, "gpu") == user(RUNNER, "cpu") == 1000  # operator/jobs.py runAsUser
    expected["whisperx/runner"] = 1000
    seen = set()
    for root in support.OVERLAYS:
        for obj, spec in support.workloads(support.render(support.OVERLAYS[root])):
            for container in spec["containers"]:
                repo = container["image"].split(":")[0]
                if repo in expected:
                    seen.add(repo)
                    assert spec["securityContext"]["runAsUser"] == expected[repo], support.ident(
                        obj
                    )
    assert {"whisperx/control-plane", "whisperx/runner"} <= seen


@pytest.mark.parametrize("path", CONTAINERFILES, ids=lambda p: p.parent.name)
def test_copied_sources_exist_and_reach_the_build_context(path: Path) -> None:
    copies = [rest for kind, rest in instructions(path) if kind == "COPY" and "--from" not in rest]
    for rest in copies:
        *sources, _ = rest.split()
        for source in sources:
            assert (support.REPO / source).exists(), source
            assert not ignored(source), f"{source} is excluded by .containerignore"


def test_context_leaves_out_local_state() -> None:
    for path in (
        ".git/config",
        ".venv/bin/python",
        "tests/conftest.py",
        ".env",
        "a/b/x.pem",
        "tests/js/node_modules/x/index.js",
        "scripts/setup.sh",
    ):
        assert ignored(path), path
    assert not ignored("api/whisperx_api/schema.py")
    assert not ignored("scripts/runner-fixups.sh")


def test_images_install_from_the_lock() -> None:
    for path in (CONTROL_PLANE, RUNNER):
        runs = " ".join(rest for kind, rest in instructions(path) if kind == "RUN")
        assert "pip install ." not in runs and "requirements" not in runs
        syncs = re.findall(r"uv sync ([^;&]*)", runs)
        assert syncs, path
        for options in syncs:
            assert "--locked" in options and "--no-dev" in options and "--no-editable" in options
        # The dependencies in a layer of their own, before the sources are copied.
        assert "--no-install-project" in syncs[0]


def test_control_plane_image_has_no_ml_stack() -> None:
    runs = " ".join(rest for kind, rest in instructions(CONTROL_PLANE) if kind == "RUN")
    assert "--extra" not in runs and "torch" not in runs and "whisperx==" not in runs
    project: dict[str, Any] = tomllib.loads((support.REPO / "pyproject.toml").read_text())
    scripts = project["project"]["scripts"]
    cmd = [rest for kind, rest in instructions(CONTROL_PLANE) if kind == "CMD"][-1]
    assert cmd.strip('[]"') in scripts
    # The commands the manifests run exist in this image.
    for root in support.OVERLAYS:
        for obj, spec in support.workloads(support.render(support.OVERLAYS[root])):
            for container in spec["containers"]:
                if container["image"].startswith("whisperx/control-plane:"):
                    assert container["command"][0] in scripts, support.ident(obj)


def test_runner_flavours() -> None:
    by_stage = stages(RUNNER)
    for flavour, extras, device in (
        ("gpu", ["runner", "gpu"], "cuda"),
        ("cpu", ["runner", "cpu-models"], "cpu"),
    ):
        steps = by_stage[flavour]
        runs = " ".join(rest for kind, rest in steps if kind == "RUN")
        (options,) = re.findall(r"uv sync ([^;&]*)", runs)
        assert re.findall(r"--extra (\S+)", options) == extras
        env = " ".join(rest for kind, rest in steps if kind == "ENV")
        assert f"WHISPERX_DEVICE={device}" in env
        assert [rest for kind, rest in steps if kind == "CMD"] == ['["whisperx-runner", "run"]']
    common = " ".join(rest for kind, rest in by_stage["common"] if kind == "RUN")
    assert "scripts/runner-fixups.sh" in common


def test_gpu_extra_brings_the_cublas_ctranslate2_opens() -> None:
    """CTranslate2 dlopens cuBLAS of one CUDA major by soname; torch's wheels may bring
    another. The `gpu` extra (the GPU image's) must carry the one CTranslate2 names."""
    import ctranslate2

    folder = Path(ctranslate2.__file__).parent.parent / "ctranslate2.libs"
    (library,) = folder.glob("libctranslate2*.so*")
    (major,) = set(re.findall(rb"libcublas\.so\.(\d+)", library.read_bytes()))
    project: dict[str, Any] = tomllib.loads((support.REPO / "pyproject.toml").read_text())
    gpu = project["project"]["optional-dependencies"]["gpu"]
    assert any(r.startswith(f"nvidia-cublas-cu{major.decode()}") for r in gpu), gpu
