"""The container images (operator/Dockerfile, extender/Dockerfile; docs/images.md), checked without a
container engine.

* Static: a small Dockerfile parser (line continuations, comments, stages, COPY/ADD flags, JSON or
  whitespace source lists) and a .dockerignore matcher (Docker's rules: ``**``, ``!`` exceptions, last
  match wins, an excluded directory excludes its contents). Every COPY/ADD from the build context must
  name files that exist and are not ignored; the final stage runs as a numeric non-root USER; no FROM
  names a registry host or floats on ``latest``; ENTRYPOINT/CMD are exec-form JSON.
* Dynamic: the builder stage is replayed on the host. Its context COPYs are applied (through
  .dockerignore) to a scratch directory, the project wheel is built there, and it is installed into a
  fresh virtualenv (no system site-packages, no editable install, cwd outside the checkout). The
  third-party dependencies are not downloaded again: the runtime closure of the wheel's own
  ``Requires-Dist`` (no extras, so no dev tools) is taken from the running environment, linked into
  one directory and put on the venv's path, and ``pip check`` proves it satisfies the pins. Then each
  image's ENTRYPOINT runs with ``--help``, the default arguments parse, and the picker serves gRPC
  health from the installed wheel until SIGTERM.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmpool.children import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"operator": ROOT / "operator" / "Dockerfile", "picker": ROOT / "extender" / "Dockerfile"}
EXPECTED_PORTS = {"operator": {8080, 8081}, "picker": {9002, 9003, 9090}}
PACKAGE_DIRS = [ROOT / "extender" / "llmpool", ROOT / "operator" / "llmpool_operator"]

# ------------------------------------------------------------------------------- Dockerfile parser


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # the rest of the logical line, continuations joined
    line: int  # first physical line (1-based)


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Copy:
    keyword: str
    flags: dict[str, str]
    sources: list[str]
    dest: str
    line: int


def parse_dockerfile(text: str) -> list[Stage]:
    """Logical instructions grouped by stage. A line ending in ``\\`` continues on the next; comment
    lines (also inside a continuation) and blank lines are dropped, as Docker does."""
    stages: list[Stage] = []
    pending: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = n
        cont = stripped.endswith("\\")
        pending.append(stripped[:-1] if cont else stripped)
        if cont:
            continue
        logical = " ".join(p.strip() for p in pending if p.strip())
        pending = []
        keyword, _, args = logical.partition(" ")
        ins = Instruction(keyword.upper(), args.strip(), start)
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif ins.keyword != "ARG" or stages:  # ARGs before the first FROM are global
            assert stages, f"line {n}: {ins.keyword} before FROM"
            stages[-1].instructions.append(ins)
    assert not pending, "the Dockerfile ends inside a line continuation"
    return stages


def parse_copy(ins: Instruction) -> Copy:
    """COPY/ADD: leading ``--flag[=value]`` options, then JSON-array or whitespace-separated paths."""
    rest = ins.args
    flags: dict[str, str] = {}
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        key, _, value = word[2:].partition("=")
        flags[key] = value
        rest = rest.lstrip()
    paths = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    assert isinstance(paths, list) and len(paths) >= 2, f"line {ins.line}: {ins.keyword} needs src and dest"
    return Copy(ins.keyword, flags, [str(p) for p in paths[:-1]], str(paths[-1]), ins.line)


def exec_form(ins: Instruction) -> list[str]:
    value = json.loads(ins.args)
    assert isinstance(value, list) and value and all(isinstance(v, str) for v in value), ins.args
    return value


def last(stage: Stage, keyword: str) -> Instruction | None:
    found = [i for i in stage.instructions if i.keyword == keyword]
    return found[-1] if found else None


# ------------------------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # "**/" = zero or more directories
                i += 1
                out += "(?:.*/)?"
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pattern.find("]", i)
            if j < 0:
                out += re.escape(c)
            else:
                body = pattern[i + 1 : j]
                out += "[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]"
                i = j
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pat = os.path.normpath(line[1:].strip() if negate else line).strip("/")
            self.rules.append((negate, _pattern_regex(pat)))

    def excluded(self, rel: str) -> bool:
        """Last matching rule wins; a rule matching a parent directory matches its contents."""
        parts = rel.strip("/").split("/")
        prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
        result = False
        for negate, rx in self.rules:
            if any(rx.match(p) for p in prefixes):
                result = not negate
        return result


def dockerignore() -> DockerIgnore:
    return DockerIgnore((ROOT / ".dockerignore").read_text())


def context_files(source: str, ignore: DockerIgnore) -> list[Path]:
    """The files a context source (wildcards allowed) contributes after .dockerignore."""
    out: list[Path] = []
    for hit in sorted(glob.glob(str(ROOT / source.lstrip("/")))):
        path = Path(hit)
        candidates = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        out += [p for p in candidates if not ignore.excluded(p.relative_to(ROOT).as_posix())]
    return out


def context_copies(stage: Stage) -> list[tuple[Copy, str]]:
    """(COPY/ADD from the build context, WORKDIR at that point) for one stage."""
    workdir, out = "/", []
    for ins in stage.instructions:
        if ins.keyword == "WORKDIR":
            workdir = os.path.join(workdir, ins.args)
        elif ins.keyword in ("COPY", "ADD"):
            cp = parse_copy(ins)
            if "from" not in cp.flags:  # a copy from another stage or image is not the context
                out.append((cp, workdir))
    return out


PARSED = {name: parse_dockerfile(path.read_text()) for name, path in DOCKERFILES.items()}


# ------------------------------------------------------------------------------- static checks


def test_parser_handles_continuations_flags_and_forms() -> None:
    stages = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nARG X=1\nFROM a:1 AS b\nRUN one \\\n  # note\n  two\n"
        'COPY --chown=1:1 --link x y* /d/\nFROM c:2\nCOPY --from=b /o /o\nADD ["p q", "r", "/s/"]\n'
        'ENTRYPOINT ["e"]\n'
    )
    assert [(s.image, s.name) for s in stages] == [("a:1", "b"), ("c:2", None)]
    assert stages[0].instructions[0].args == "one two"
    cp = parse_copy(stages[0].instructions[1])
    assert cp.flags == {"chown": "1:1", "link": ""} and cp.sources == ["x", "y*"] and cp.dest == "/d/"
    assert context_copies(stages[1])[0][0].sources == ["p q", "r"]
    ig = DockerIgnore("**/__pycache__\ndocs\n!docs/keep.md\n*.log\n")
    assert ig.excluded("a/b/__pycache__/m.pyc") and ig.excluded("docs/x.md") and ig.excluded("x.log")
    assert not ig.excluded("docs/keep.md") and not ig.excluded("a/x.log") and not ig.excluded("src/a.py")


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_context_copies_exist_and_are_not_ignored(image: str) -> None:
    ignore = dockerignore()
    copies = [cp for stage in PARSED[image] for cp, _ in context_copies(stage)]
    assert copies, "no COPY from the build context"
    for cp in copies:
        assert cp.keyword == "COPY", f"line {cp.line}: use COPY, not ADD, for context files"
        for src in cp.sources:
            assert context_files(src, ignore), f"line {cp.line}: {src!r} is missing or all .dockerignored"


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    ignore = dockerignore()
    for kept in ["pyproject.toml", "README.md", "extender/llmpool/cli.py",
                 "extender/llmpool/predict/models/fast.json", "operator/llmpool_operator/main.py",
                 "extender/llmpool/routing/profiles/a100-llama3-8b.yaml"]:  # fmt: skip
        assert not ignore.excluded(kept), kept
    for dropped in [".git/HEAD", ".venv/bin/python", "tests/test_images.py", "docs/picker.md",
                    "llmpool.egg-info/PKG-INFO", "extender/llmpool/__pycache__/cli.cpython-311.pyc",
                    "build/lib/x.py", "dist/llmpool-0.1.0-py3-none-any.whl", ".pytest_cache/v",
                    ".mypy_cache/x", ".ruff_cache/x", ".hypothesis/x"]:  # fmt: skip
        assert ignore.excluded(dropped), dropped


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_final_stage(image: str) -> None:
    stages = PARSED[image]
    names = {s.name for s in stages if s.name}
    assert len(stages) >= 2, "multi-stage: a builder and a final stage"
    for stage in stages:
        if stage.image in names:
            continue
        repo, _, tag = stage.image.partition("@")[0].rpartition(":")
        first = stage.image.split("/")[0]
        assert "/" not in stage.image or not ("." in first or ":" in first or first == "localhost"), (
            f"FROM {stage.image}: no registry host name"
        )
        assert repo and tag and tag != "latest", f"FROM {stage.image}: pin a tag"
    final = stages[-1]
    assert final.image.startswith("python:3.11-slim")
    user = last(final, "USER")
    assert user is not None, "the final stage sets USER"
    uid = user.args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user.args}: a numeric non-root UID"
    entry = last(final, "ENTRYPOINT")
    assert entry is not None
    assert exec_form(entry)[:2] == ["llmpool", "operator" if image == "operator" else "extender"]
    cmd = last(final, "CMD")
    if cmd is not None:
        exec_form(cmd)
    expose = {
        int(p.split("/")[0]) for i in final.instructions if i.keyword == "EXPOSE" for p in i.args.split()
    }
    assert expose == EXPECTED_PORTS[image]
    labels = " ".join(i.args for i in final.instructions if i.keyword == "LABEL")
    assert "org.opencontainers.image.title" in labels and "org.opencontainers.image.licenses" in labels
    final_copies = [parse_copy(i) for i in final.instructions if i.keyword in ("COPY", "ADD")]
    assert final_copies and all(cp.flags.get("from") in names for cp in final_copies), (
        "the final stage takes only the builder's venv"
    )
    runs = " ".join(i.args for i in final.instructions if i.keyword == "RUN")
    assert not re.search(r"\b(pip|apt-get|gcc|build-essential)\b", runs), "no installs in the final stage"


# ------------------------------------------------------------------------------- the wheel in a fresh venv


def _requirement_closure(requires: list[str]) -> list[importlib.metadata.Distribution]:
    """Distributions (from the running environment) that ``requires`` pulls in, extras included."""
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError:  # pragma: no cover - pip always vendors it
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
        from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]

    seen: dict[str, importlib.metadata.Distribution] = {}
    todo: list[tuple[str, str]] = [(r, "") for r in requires]
    while todo:
        text, extra = todo.pop()
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        key = canonicalize_name(req.name)
        dist = importlib.metadata.distribution(req.name)
        assert dist.version in req.specifier or not req.specifier, f"{req} but {dist.version} is installed"
        for e in req.extras:
            todo += [(r, e) for r in dist.requires or []]
        if key not in seen:
            seen[key] = dist
            todo += [(r, "") for r in dist.requires or []]
    return list(seen.values())


def _link_distributions(dists: list[importlib.metadata.Distribution], target: Path) -> None:
    """Symlink each distribution's top-level modules and its .dist-info into ``target``."""
    target.mkdir()
    for dist in dists:
        base = Path(str(dist.locate_file("")))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops - {"__pycache__"}):
            src, dst = base / top, target / top
            if (src.exists() or src.is_symlink()) and not dst.exists() and not top.endswith(".pth"):
                dst.symlink_to(src)


@dataclass
class Venv:
    root: Path
    wheel: Path
    home: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def env(self) -> dict[str, str]:
        """What the image's ENV gives: the venv first on PATH; nothing of the dev environment."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
        env.update(
            PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
            HOME=str(self.home),
            PYTHONUNBUFFERED="1",
            PYTHONDONTWRITEBYTECODE="1",
            MPLCONFIGDIR=str(self.home / "matplotlib"),
        )
        return env

    def run(
        self, argv: list[str], timeout: float = 60.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        exe = shutil.which(argv[0], path=str(self.bin))
        assert exe is not None and Path(exe).parent == self.bin, f"{argv[0]} is not in the venv"
        return subprocess.run(
            [exe, *argv[1:]],
            cwd=self.home,
            env={**self.env(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _replay_builder_copies(stage: Stage, ctx: Path) -> Path:
    """Apply the stage's context COPYs (through .dockerignore) under ``ctx``; returns the last WORKDIR."""
    ignore = dockerignore()
    for cp, workdir in context_copies(stage):
        dest = ctx / os.path.join(workdir, cp.dest).lstrip("/")
        for src in cp.sources:
            base = Path(glob.glob(str(ROOT / src))[0]) if not glob.has_magic(src) else None
            for f in context_files(src, ignore):
                if base is not None and base.is_dir():
                    out = dest / f.relative_to(base)  # a directory's contents go into dest
                elif cp.dest.endswith("/") or len(cp.sources) > 1 or glob.has_magic(src):
                    out = dest / f.name
                else:
                    out = dest
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)
    last_workdir = [i.args for i in stage.instructions if i.keyword == "WORKDIR"]
    return ctx / (last_workdir[-1].lstrip("/") if last_workdir else "")


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    tmp = tmp_path_factory.mktemp("images")
    builders = {PARSED[n][0].image: PARSED[n][0] for n in DOCKERFILES}
    steps = {repr([(c.sources, c.dest, w) for c, w in context_copies(PARSED[n][0])]) for n in DOCKERFILES}
    assert len(builders) == 1 and len(steps) == 1, "the two images share one builder stage"
    src = _replay_builder_copies(PARSED["picker"][0], tmp / "ctx")
    # Built as the Dockerfile builds it: with pip's build isolation, so the backend is the one pinned
    # in pyproject.toml's [build-system] (setuptools and wheel come from the index, as in the image).
    isolation: list[str] = []
    wheels = tmp / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(wheels), str(src)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("llmpool-*.whl")
    root = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=60)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install", "-q",
         "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [
            line.split(":", 1)[1].strip()
            for line in zf.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    _link_distributions(_requirement_closure(requires), tmp / "deps")
    (site,) = root.glob("lib/python*/site-packages")
    (site / "_image_deps.pth").write_text(f"{tmp / 'deps'}\n")
    home = tmp / "home"
    home.mkdir()
    v = Venv(root, wheel, home)
    check = v.run(["python", "-m", "pip", "check"]) if (root / "bin" / "pip").exists() else None
    if check is None:
        check = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "check"],
            capture_output=True, text=True, timeout=60, cwd=home, env=v.env(),
        )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    return v


def test_wheel_carries_every_package_file(venv: Venv) -> None:
    """Modules and package data (profiles, py.typed, the fast-tier predictor's model files under
    llmpool/predict/models/) all reach the wheel; an image installs nothing else."""
    with zipfile.ZipFile(venv.wheel) as zf:
        names = set(zf.namelist())
    missing = []
    for pkg in PACKAGE_DIRS:
        for f in pkg.rglob("*"):
            rel = f.relative_to(pkg.parent).as_posix()
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc" and rel not in names:
                missing.append(rel)
    assert not missing, f"not in the wheel (setuptools package-data in pyproject.toml?): {missing}"


def test_venv_is_not_the_checkout(venv: Venv) -> None:
    out = venv.run(["python", "-c", "import llmpool, llmpool_operator; "
                    "print(llmpool.__file__); print(llmpool_operator.__file__)"])  # fmt: skip
    assert out.returncode == 0, out.stderr
    for path in out.stdout.splitlines():
        assert Path(path).is_relative_to(venv.root), path


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_entrypoint_help(venv: Venv, image: str) -> None:
    entry = exec_form(last(PARSED[image][-1], "ENTRYPOINT"))  # type: ignore[arg-type]
    out = venv.run([*entry, "--help"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and "--metrics-port" in out.stdout


def _parsed_args(venv: Venv, module: str, argv: list[str]) -> dict[str, object]:
    code = (
        "import json, sys\n"
        f"from {module} import build_parser\n"
        "print(json.dumps(vars(build_parser().parse_args(json.loads(sys.argv[1]))), default=str))\n"
    )
    out = venv.run(
        ["python", "-c", code, json.dumps(argv)], env={"LLMPOOL_OPERATOR_NO_DEFAULT_REGISTRY": "1"}
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


def test_operator_default_args_match_the_exposed_ports(venv: Venv) -> None:
    final = PARSED["operator"][-1]
    entry = exec_form(last(final, "ENTRYPOINT"))  # type: ignore[arg-type]
    cmd = exec_form(last(final, "CMD")) if last(final, "CMD") else []
    args = _parsed_args(venv, "llmpool_operator.main", [*entry[2:], *cmd])
    assert {args["liveness_port"], args["metrics_port"]} == EXPECTED_PORTS["operator"]


def test_picker_default_ports_match_the_exposed_ports(venv: Venv) -> None:
    final = PARSED["picker"][-1]
    entry = exec_form(last(final, "ENTRYPOINT"))  # type: ignore[arg-type]
    cmd = exec_form(last(final, "CMD")) if last(final, "CMD") else []
    args = _parsed_args(venv, "llmpool.cli", [*entry[1:], *cmd, "--static-endpoints", "127.0.0.1:1"])
    assert {args["grpc_port"], args["health_port"], args["metrics_port"]} == EXPECTED_PORTS["picker"]
    assert args["host"] == "0.0.0.0"


@contextlib.contextmanager
def _running(venv: Venv, argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    exe = shutil.which(argv[0], path=str(venv.bin))
    assert exe is not None
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [exe, *argv[1:]], cwd=venv.home, env=venv.env(), stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_picker_serves_health_from_the_wheel_and_stops_on_sigterm(venv: Venv, tmp_path: Path) -> None:
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health_pb2")
    health_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")
    entry = exec_form(last(PARSED["picker"][-1], "ENTRYPOINT"))  # type: ignore[arg-type]
    ports = {"--grpc-port": free_port(), "--health-port": free_port(), "--metrics-port": free_port()}
    argv = [*entry, "--static-endpoints", f"127.0.0.1:{free_port()}", "--plaintext", "--host", "127.0.0.1"]
    argv += [str(x) for kv in ports.items() for x in kv]
    log = tmp_path / "picker.log"
    with _running(venv, argv, log) as proc:
        status, deadline = None, time.monotonic() + 30
        while status != "SERVING" and time.monotonic() < deadline:
            assert proc.poll() is None, f"exited {proc.returncode}: {log.read_text()[-2000:]}"
            with (
                contextlib.suppress(grpc.RpcError),
                grpc.insecure_channel(f"127.0.0.1:{ports['--health-port']}") as channel,
            ):
                resp = health_grpc.HealthStub(channel).Check(
                    health.HealthCheckRequest(service="liveness"), timeout=1.0
                )
                status = health.HealthCheckResponse.ServingStatus.Name(resp.status)
            if status != "SERVING":
                time.sleep(0.1)
        assert status == "SERVING", log.read_text()[-2000:]
        url = f"http://127.0.0.1:{ports['--metrics-port']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200 and b"llmpool_" in resp.read()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=40)  # no open streams: the drain should not wait --drain-seconds
        assert rc == 0, log.read_text()[-2000:]


def test_docs_describe_the_images() -> None:
    text = (ROOT / "docs" / "images.md").read_text()
    for needle in ["docker build -f operator/Dockerfile", "docker build -f extender/Dockerfile", "65532",
                   "9002", "9003", "9090", "8080", "8081", "predict/models"]:  # fmt: skip
        assert needle in text, needle
