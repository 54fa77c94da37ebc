"""``make deb``: the package a Debian/Ubuntu admin installs (README "Running it for real").

Built once for this module (about 30 s: a venv with relay's dependencies, compiled, packed), then:
- checked as an archive: paths, modes, owners, the conffile, the maintainer scripts, the control fields;
- the unit: ExecStart= and ExecStartPre= run the installed /usr/bin/relay, ``systemd-analyze verify``;
- run out of its unpacked tree: the venv's own Python delivers a message, writing nothing under /opt;
- as root with RELAY_TEST_INSTALL_DEB=1 (.ci/run sets it): installed on this machine with dpkg, the
  daemon run with the unit's ExecStart line as the relay user, a message delivered, remove, reinstall and
  upgrade keeping the edited relay.yaml, the secrets and the spool, and purge.

Skipped where no package can be built (no dpkg-deb, or Debian's python3 without python3-venv).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from relay.commands import sendmail
from tests.conftest import UpstreamFactory, smtp_send, wait_for_entries
from tests.servers import Upstream
from tests.test_daemon import RelayProcess, write_config

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")
VENV = "/opt/relay/venv"
PASSWORD = "deb-test-secret-4c1d"
# Read at import: conftest's autouse fixture clears RELAY_* variables before each test runs.
INSTALL_ON_THIS_MACHINE = os.environ.get("RELAY_TEST_INSTALL_DEB") == "1"


def _why_no_build() -> str | None:
    if shutil.which("dpkg-deb") is None:
        return "no dpkg-deb: the package is built on Debian or Ubuntu"
    if not SYSTEM_PYTHON.exists():
        return f"no {SYSTEM_PYTHON}: the package runs on the system's python3"
    if subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip"], capture_output=True, check=False).returncode:
        return f"{SYSTEM_PYTHON} has no ensurepip: apt install python3-venv"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_no_build() is not None, reason=str(_why_no_build()))]


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(["make", "-s", "deb"], cwd=REPO, env={**os.environ, "DEB_OUT": str(out)}, check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    [built] = out.glob("relay_*.deb")
    return built


@pytest.fixture(scope="module")
def tree(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unpacked")
    subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    return root


@dataclass(frozen=True)
class Member:
    mode: str
    owner: str
    target: str | None


def members(deb: Path) -> dict[str, Member]:
    """``dpkg-deb -c``: path (without ./ and trailing /) -> mode string, owner/group, symlink target."""
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in listing.splitlines():
        mode, owner, _size, _date, _time, rest = line.split(None, 5)
        path, _, target = rest.partition(" -> ")
        if path != "./":
            found["/" + path.removeprefix("./").rstrip("/")] = Member(mode, owner, target or None)
    return found


def unit_command(unit: str, key: str) -> list[str]:
    [line] = re.findall(rf"^{key}=(.+)$", unit, re.MULTILINE)
    return shlex.split(line)


class TestArchive:
    def test_paths_modes_and_owners(self, deb: Path) -> None:
        """What dpkg will put where: the commands on PATH into the venv, the unit, the config and the
        directories with their modes (owners come from the postinst's dpkg-statoverride)."""
        found = members(deb)

        assert f"{VENV}/bin/relay" == found["/usr/bin/relay"].target
        assert f"{VENV}/bin/relay-sendmail" == found["/usr/bin/relay-sendmail"].target
        assert found[f"{VENV}/bin/relay"].mode == "-rwxr-xr-x"
        assert found["/lib/systemd/system/relay.service"].mode == "-rw-r--r--"
        assert found["/etc/relay"].mode == "drwxr-x---"
        assert found["/etc/relay/relay.yaml"].mode == "-rw-r-----"
        assert found["/etc/relay/secrets"].mode == "drwx------"
        assert found["/var/lib/relay"].mode == "drwxr-x---"
        assert found["/var/spool/relay"].mode == "drwxr-xr-x"
        assert found["/var/spool/relay/maildrop"].mode == "drwx------"  # 3733 relay:relay by the postinst
        assert {"root/root"} == {m.owner for m in found.values()}
        assert [] == [p for p in found if p.startswith(("/etc/relay/secrets/", "/var/lib/relay/"))]
        assert "/usr/sbin/sendmail" not in found
        allowed = ("/etc/relay", "/lib/systemd/system/relay.service", "/opt/relay", "/usr/bin/relay",
                   "/usr/share/doc/relay", "/var/lib/relay", "/var/spool/relay")  # fmt: skip
        assert [] == [p for p in found if not p.startswith(allowed) and not any(a.startswith(p + "/") for a in allowed)]

    def test_control_conffile_and_scripts(self, deb: Path, tmp_path: Path) -> None:
        """relay.yaml is a conffile (an upgrade keeps the admin's edits); python3 is pinned to the minor
        version the venv was made with; the maintainer scripts parse; nothing enables or starts the unit."""
        subprocess.run(["dpkg-deb", "-e", deb, tmp_path / "DEBIAN"], check=True)
        fields = subprocess.run(["dpkg-deb", "-f", deb, "Package", "Depends"], capture_output=True, text=True,
                                check=True).stdout  # fmt: skip
        major_minor = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(*sys.version_info[:2])"],
                                     capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        major, minor = map(int, major_minor)

        assert "/etc/relay/relay.yaml\n" == (tmp_path / "DEBIAN" / "conffiles").read_text()
        assert "Package: relay\n" in fields
        assert f"python3 (>= {major}.{minor}), python3 (<< {major}.{minor + 1}), adduser" in fields
        for script in ("postinst", "prerm", "postrm"):
            subprocess.run(["sh", "-n", tmp_path / "DEBIAN" / script], check=True)
        postinst = (tmp_path / "DEBIAN" / "postinst").read_text()
        assert not re.search(r"systemctl\s+(enable|start|restart)|deb-systemd-helper\s+enable", postinst)

    def test_conffile_is_the_example_and_no_build_path_is_left(self, tree: Path) -> None:
        """The venv was built in a staging directory: no file may still name it (a #! line that does
        would not run once installed)."""
        leftovers = [str(p) for p in tree.rglob("*")
                     if p.is_file() and not p.is_symlink() and b"/relay-deb." in p.read_bytes()]  # fmt: skip

        assert (REPO / "config.example.yaml").read_bytes() == (tree / "etc/relay/relay.yaml").read_bytes()
        assert [] == leftovers


    def test_the_commands_name_the_packages_version(self, deb: Path, tree: Path) -> None:
        """relay --version (and relay_started) said 0.1.0 where dpkg has 0.1.0+git...: after an upgrade the
        admin could not tell which build runs."""
        version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True, text=True,
                                 check=True).stdout.strip()  # fmt: skip
        [init] = tree.glob("opt/relay/venv/lib/python3*/site-packages/relay/__init__.py")

        assert f'__version__ = "{version}"' in init.read_text()
        assert "+git" in version or "DEB_VERSION" in os.environ


class TestUnit:
    def test_exec_lines_run_the_installed_command(self, tree: Path) -> None:
        """The unit the package installs is the repository's, hardening and all, and its ExecStartPre= and
        ExecStart= name /usr/bin/relay: in the package, a link to the venv's script run by its Python."""
        unit = (tree / "lib/systemd/system/relay.service").read_text()
        script = tree / os.readlink(tree / "usr/bin/relay").lstrip("/")

        assert (REPO / "systemd" / "relay.service").read_text() == unit
        assert ["/usr/bin/relay", "check", "--startup", "/etc/relay/relay.yaml"] == unit_command(unit, "ExecStartPre")
        assert ["/usr/bin/relay", "serve", "-c", "/etc/relay/relay.yaml"] == unit_command(unit, "ExecStart")
        assert script.stat().st_mode & stat.S_IXOTH
        interpreter = script.read_text().splitlines()[0].removeprefix("#!")
        assert interpreter.startswith(f"{VENV}/bin/python")
        assert SYSTEM_PYTHON.resolve() == (tree / interpreter.lstrip("/")).resolve()
        assert "ProtectHome=yes" in unit and "ProtectSystem=strict" in unit and "User=relay" in unit
        assert "/usr/local" not in unit and "pip install" not in unit

    @pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
    def test_systemd_analyze_verify(self, tree: Path, tmp_path: Path) -> None:
        """systemd's own check, silent: with /usr/bin/relay not installed here, the unit is checked with the
        command's path inside the unpacked package (systemd-analyze wants the executable to exist)."""
        unit = (tree / "lib/systemd/system/relay.service").read_text()
        (tmp_path / "relay.service").write_text(unit.replace("/usr/bin/relay", str(tree / VENV.lstrip("/") / "bin/relay")))

        verify = subprocess.run(["systemd-analyze", "verify", tmp_path / "relay.service"], capture_output=True,
                                text=True, check=False)  # fmt: skip

        assert (0, "", "") == (verify.returncode, verify.stdout, verify.stderr)


class TestPackagedRelay:
    def test_its_venv_delivers_a_message_and_writes_nothing_under_opt(
        self, tree: Path, tmp_path: Path, upstream: UpstreamFactory, processes: list[RelayProcess]
    ) -> None:
        """The venv's Python finds relay and every dependency (uvloop, pydantic-core: compiled ones) in the
        package, not in this checkout, and its bytecode is valid: nothing is written under /opt."""
        python = tree / VENV.lstrip("/") / "bin/python"
        before = {p: p.stat().st_mtime_ns for p in (tree / "opt").rglob("*") if not p.is_symlink()}
        where = subprocess.run([python, "-c", "import relay, uvloop, pydantic_core; print(relay.__file__)"],
                               cwd=tmp_path, capture_output=True, text=True, check=True).stdout  # fmt: skip
        up = upstream("provider", security="starttls", accounts={"laskutus@rakennus.fi": "daemon-test-secret-9f2c"})
        config = write_config(tmp_path, upstream, up)
        relay = RelayProcess(config, command=[str(python), "-m", "relay", "serve", "-c", str(config)], cwd=tmp_path)
        processes.append(relay.start())

        smtp_send(relay.port, "erp@legacy.local", ["c@example.com"], b"Subject: Lasku 1\r\n\r\nx\r\n")
        [got] = up.wait_for(1)
        relay.signal(signal.SIGTERM)

        assert 0 == relay.wait()
        assert where.startswith(str(tree / VENV.lstrip("/")))
        assert "laskutus@rakennus.fi" == got.mail_from
        after = {p: p.stat().st_mtime_ns for p in (tree / "opt").rglob("*") if not p.is_symlink()}
        assert before == after


# ---- installed on this machine -------------------------------------------------------------------------

ETC = Path("/etc/relay")
STATE = Path("/var/lib/relay")
SPOOL = STATE / "spool"
DROP = Path("/var/spool/relay")


def dpkg(*args: str | Path) -> str:
    done = subprocess.run(["dpkg", *args], capture_output=True, text=True, check=False, timeout=120)
    assert 0 == done.returncode, done.stdout + done.stderr
    return done.stdout + done.stderr


def owner_mode(path: Path) -> tuple[str, str, str]:
    st = path.stat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, oct(stat.S_IMODE(st.st_mode))


def assert_owners_and_modes() -> None:
    assert ("relay", "relay", "0o750") == owner_mode(STATE)
    assert ("root", "relay", "0o750") == owner_mode(ETC)
    assert ("root", "relay", "0o640") == owner_mode(ETC / "relay.yaml")
    assert ("relay", "relay", "0o700") == owner_mode(ETC / "secrets")
    assert ("relay", "relay", "0o3733") == owner_mode(DROP / "maildrop")


def configure_as_an_admin(upstream: UpstreamFactory, up: Upstream, tmp_path: Path) -> str:
    """Edit /etc/relay/relay.yaml (port 0: the OS picks; logs as JSON for the test), write the password
    into /etc/relay/secrets and the provider's CA into /etc/relay, owned as the README says."""
    shutil.copy(upstream.ca_file, ETC / "ca.pem")
    (ETC / "ca.pem").chmod(0o644)
    secret = ETC / "secrets" / "provider"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    shutil.chown(secret, "relay", "relay")
    config = yaml.safe_load(write_config(tmp_path, upstream, up).read_text())
    del config["spool_dir"]  # relay's default: /var/lib/relay/spool
    config["upstreams"]["provider"].update(ca_file=str(ETC / "ca.pem"), password_file=str(secret))
    text = "# edited by the admin\n" + yaml.safe_dump(config)
    (ETC / "relay.yaml").write_text(text)
    return text


def start_as_the_unit_does() -> RelayProcess:
    """The unit's own ExecStartPre= and ExecStart= lines, as User=relay, in WorkingDirectory= with UMask=.
    setpriv, not runuser: runuser answers SIGTERM by killing its child 2 s later, cutting the drain short."""
    unit = Path("/lib/systemd/system/relay.service").read_text()
    as_relay = ["setpriv", "--reuid=relay", "--regid=relay", "--init-groups", "--"]
    check = subprocess.run(as_relay + unit_command(unit, "ExecStartPre"), capture_output=True, text=True,
                           cwd=STATE, check=False)  # fmt: skip
    assert 0 == check.returncode, check.stdout + check.stderr
    return RelayProcess(ETC / "relay.yaml", command=as_relay + unit_command(unit, "ExecStart"), cwd=STATE,
                        umask=0o077).start()  # fmt: skip


def stop(relay: RelayProcess) -> None:
    relay.signal(signal.SIGTERM)
    assert 0 == relay.wait()


@pytest.fixture
def clean_machine() -> Iterator[None]:
    """Refuse to touch a machine where relay is installed or has left files; leave it as it was found."""
    listed = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", "relay"], capture_output=True, text=True,
                            check=False).stdout  # fmt: skip
    if "installed" in listed or "config-files" in listed or ETC.exists() or STATE.exists() or DROP.exists():
        pytest.skip("relay is installed here (or left /etc/relay or /var/lib/relay): not touching it")
    had_user = subprocess.run(["getent", "passwd", "relay"], capture_output=True, check=False).returncode == 0
    try:
        yield
    finally:
        subprocess.run(["dpkg", "--purge", "relay"], capture_output=True, check=False)
        shutil.rmtree(ETC, ignore_errors=True)
        shutil.rmtree(STATE, ignore_errors=True)
        shutil.rmtree(DROP, ignore_errors=True)
        if not had_user:
            subprocess.run(["userdel", "relay"], capture_output=True, check=False)
            subprocess.run(["groupdel", "relay"], capture_output=True, check=False)


@pytest.mark.skipif(not INSTALL_ON_THIS_MACHINE or os.geteuid() != 0,
                    reason="installs a package on this machine: as root with RELAY_TEST_INSTALL_DEB=1 (.ci/run)")
def _listening(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except OSError:
        return False
    return True


def test_installed_remove_reinstall_upgrade_purge(
    deb: Path, tmp_path: Path, upstream: UpstreamFactory, processes: list[RelayProcess], clean_machine: None
) -> None:  # fmt: skip
    """1. install: the relay user, owners and modes, the unit not enabled, systemd-analyze verify silent
    2. the admin's edits; the unit's lines as relay: one message delivered, one deferred by the provider
    3. remove, install again, upgrade (install over itself): config, secrets and spool kept
    4. purge with mail queued: /etc/relay gone, the spool kept; 5. install again: it is delivered
    6. purge: nothing left but the relay user (Debian leaves system users)."""
    if _listening(sendmail.FALLBACK):  # relay-sendmail, not able to read relay.yaml, would hand its mail to that
        pytest.skip(f"another server listens on {sendmail.FALLBACK[0]}:{sendmail.FALLBACK[1]}, relay's default port")
    up = upstream("provider", security="starttls", accounts={"laskutus@rakennus.fi": PASSWORD})
    up.faults.rcpt["later@example.com"] = "451 4.3.0 Try again later"

    dpkg("--install", deb)
    account = pwd.getpwnam("relay")
    assert (account.pw_dir, account.pw_shell) == (str(STATE), "/usr/sbin/nologin") and account.pw_uid < 1000
    assert_owners_and_modes()
    assert Path(shutil.which("relay") or "").resolve() == Path(f"{VENV}/bin/relay")
    assert not Path("/etc/systemd/system/multi-user.target.wants/relay.service").exists()
    assert "" == dpkg("--verify", "relay")
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", "relay.service"], capture_output=True, text=True,
                                check=False)  # fmt: skip
        assert (0, "", "") == (verify.returncode, verify.stdout, verify.stderr)

    edited = configure_as_an_admin(upstream, up, tmp_path)
    relay = start_as_the_unit_does()
    processes.append(relay)
    smtp_send(relay.port, "erp@legacy.local", ["c@example.com"], b"Subject: Lasku 1\r\n\r\nx\r\n")
    smtp_send(relay.port, "erp@legacy.local", ["later@example.com"], b"Subject: Lasku 2\r\n\r\nx\r\n")
    [got] = up.wait_for(1)
    wait_for_entries(SPOOL, "deferred")
    stop(relay)
    queued = sorted(p.name for p in (SPOOL / "deferred").iterdir())
    assert "laskutus@rakennus.fi" == got.mail_from
    assert 1 == len(queued)
    assert {"relay"} == {pwd.getpwuid(p.stat().st_uid).pw_name for p in SPOOL.rglob("*")}

    dpkg("--remove", "relay")
    assert not Path("/usr/bin/relay").exists() and not Path(VENV).exists()
    assert edited == (ETC / "relay.yaml").read_text()
    for again in ("reinstall", "upgrade"):
        dpkg("--install", deb)
        assert edited == (ETC / "relay.yaml").read_text(), again
        assert PASSWORD + "\n" == (ETC / "secrets" / "provider").read_text(), again
        assert queued == sorted(p.name for p in (SPOOL / "deferred").iterdir()), again
        assert_owners_and_modes()

    said = dpkg("--purge", "relay")
    assert not ETC.exists()
    assert queued == sorted(p.name for p in (SPOOL / "deferred").iterdir())
    assert ["spool"] == [p.name for p in STATE.iterdir()]
    assert f"{SPOOL} still holds undelivered mail" in said

    dpkg("--install", deb)
    assert_owners_and_modes()
    configure_as_an_admin(upstream, up, tmp_path)
    up.faults.rcpt.clear()
    relay = start_as_the_unit_does()
    processes.append(relay)
    later = up.wait_for(2)[1]
    stop(relay)
    assert ["later@example.com"] == later.rcpt_tos

    # relay stopped: another OS user's cron job (it cannot read relay.yaml) leaves its mail in the package's
    # drop directory, and the next start sends it
    done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", "relay-sendmail",
                           "-i", "cron@example.com"], input=b"Subject: while down\n\nx\n", capture_output=True,
                          cwd="/", check=False)  # fmt: skip
    assert 0 == done.returncode, done.stderr
    assert b"the mail waits in /var/spool/relay/maildrop" in done.stderr
    relay = start_as_the_unit_does()
    processes.append(relay)
    dropped = up.wait_for(3)[2]
    stop(relay)
    assert ["cron@example.com"] == dropped.rcpt_tos
    assert ["bad"] == [p.name for p in (DROP / "maildrop").iterdir()]

    dpkg("--purge", "relay")
    assert not ETC.exists() and not STATE.exists() and not DROP.exists() and not Path("/opt/relay").exists()
    assert "/etc/relay" not in subprocess.run(["dpkg-statoverride", "--list"], capture_output=True, text=True,
                                              check=True).stdout  # fmt: skip
