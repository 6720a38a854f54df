"""docs/operations.md run as written: every `edgectl` and `edge-agent` command of every fenced block
that has no `# needs:` line, in document order, against the shipped broker config (TLS, device and
operator listeners, ACLs) on a real Mosquitto and a real agent, cam-1 of group lab.

The reader this test plays has what the guide assumes: a connection profile (the guide's own
example, written where edgectl reads it), the broker's CA and the operator's password file, a spare
device credential for `broker check`, and a fleet where cam-1 runs model m v1 and is in the signed
inventory of group lab. Where the guide's story moves on between two blocks (m v3 reaches the group
before the remote rollback), `BETWEEN` says so. The guide names a site broker the test cannot be;
`SUBSTITUTIONS` is the whole list of what the test changes in a command or in the profile.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import Pki
from tests.e2e.test_docs_commands import SERVICES, Sandbox, board, committed, model_state
from tests.support.broker import OPERATOR, AclBroker, shipped_broker_for
from tests.support.docs import ROOT, Block, Command, blocks, split_line

GUIDE = ROOT / "docs" / "operations.md"
DEVICE = "cam-1"
GROUP = "lab"
MODEL = "m"
SPARE = "check-1"  # the spare device credential `broker check` uses
# The bundles the reader has made (`edgectl package`, as the guide shows for m v5), by zoo model.
BUNDLES = {1: "dense_f32", 2: "dense_f32_v2", 3: "dense_f32_batch1"}


def substitutions(b: AclBroker, var: Path) -> dict[str, str]:
    """What the test changes in the guide's text: the site broker's listeners become the test broker's,
    the collector host's folders under /var folders of the sandbox, and `$(hostname)` is expanded as a
    shell would."""
    device_port = b.url.rsplit(":", 1)[1]
    return {
        "broker.example.net:8884": f"127.0.0.1:{b.operator_port}",
        "broker.example.net:8883": f"127.0.0.1:{device_port}",
        "/var/log/edgefleet/": f"{var}/log/edgefleet/",
        "/var/lib/edgefleet/": f"{var}/lib/edgefleet/",
        "$(hostname)": socket.gethostname(),
    }


@dataclass
class Step:
    """One command of the guide and what its transcript (if any) shows after it."""

    block: Block
    command: Command
    output: list[str] = field(default_factory=list)

    @property
    def sub(self) -> tuple[str, ...]:
        """The subcommand words (`("push",)`, `("fleet", "watch")`), options left out."""
        return tuple(a for a in self.command.args[:2] if not a.startswith("-"))

    @property
    def error(self) -> str | None:
        """The error line the transcript shows for this command, when it shows one."""
        prefix = f"{self.command.program}: error: "
        return next((line for line in self.output if line.startswith(prefix)), None)

    def follows(self) -> bool:
        """Whether the command runs until stopped (the tour's services, `logs --follow`), not `--once`."""
        args = self.command.args
        if self.sub[:1] == ("logs",):
            return "--follow" in args or "-f" in args
        if self.sub[:1] == ("timestamp",):
            return "--every" in args
        return any(self.sub[:len(s)] == s for s in SERVICES) and "--once" not in args


def steps(block: Block) -> list[Step]:
    """A block's commands, each with the output its transcript shows (text blocks)."""
    if block.lang != "text":
        return [Step(block, cmd) for cmd in block.commands()]
    found: list[Step] = []
    for line in block.text.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("$ "):
            found += [Step(block, cmd) for cmd in split_line(stripped[2:], block.where)]
        elif found:
            found[-1].output.append(line)
    return found


def runnable_steps() -> list[Step]:
    """Every command of the guide's fenced blocks without `# needs:`, in document order."""
    found = [step for block in blocks(GUIDE) if block.needs is None for step in steps(block)]
    others = [f"{s.command.where}: {s.command.text}" for s in found
              if not (s.command.runs("edgectl") or s.command.runs("edge-agent"))]
    assert not others, "commands of other tools belong in a block with '# needs:':\n" + "\n".join(others)
    return found


def profile_example() -> str:
    """The guide's example connection profile (the toml block with `[profiles.`)."""
    found = [b.text for b in blocks(GUIDE) if b.lang == "toml" and "[profiles." in b.text]
    assert len(found) == 1, "docs/operations.md: no single example of edgectl.toml"
    return found[0]


class Workstation(Sandbox):
    """The operator's machine: its home (profile, completions), its working folder (keys/, bundles/,
    ca.pem, password files) and the board it administers (`edge-agent` runs with cam-1's config)."""

    def __init__(self, cwd: Path, home: Path, subs: dict[str, str]):
        super().__init__(cwd)
        self.subs = subs
        self.env["HOME"] = str(home)
        self.env["XDG_CONFIG_HOME"] = str(home / ".config")
        self.env["XDG_DATA_HOME"] = str(home / ".local" / "share")
        self.env["COLUMNS"] = "200"

    def substituted(self, cmd: Command) -> Command:
        argv = []
        for word in cmd.argv:
            for old, new in self.subs.items():
                word = word.replace(old, new)
            argv.append(word)
        return Command(cmd.where, tuple(argv), cmd.text)

    def argv(self, cmd: Command) -> list[str]:
        return super().argv(self.substituted(cmd))

    def execute(self, step: Step) -> subprocess.CompletedProcess[str]:
        """Run a command that ends by itself; a `> FILE` redirection writes its output there, as the shell would."""
        argv = self.argv(step.command)
        target = None
        if ">" in argv:
            at = argv.index(">")
            argv, target = argv[:at], Path(argv[at + 1].replace("~", self.env["HOME"], 1))
        res = subprocess.run(argv, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=180)
        if step.error is not None:
            assert res.returncode != 0 and step.error in res.stderr.splitlines(), \
                f"{step.command.where}: `{step.command.text}` should fail with {step.error!r}:\n{res.stdout}\n{res.stderr}"
            return res
        assert res.returncode == 0, \
            f"{step.command.where}: `{step.command.text}` exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)  # the reader's folder, as the guide tells them
            target.write_text(res.stdout)
        return res


@pytest.fixture
def site(tmp_path: Path, pki: Pki) -> Iterator[AclBroker]:
    """The shipped broker config with TLS, users cam-1 and the spare check-1 on the device listener."""
    b = shipped_broker_for(tmp_path / "broker", pki, devices=(DEVICE, SPARE))
    b.broker.start()
    try:
        yield b
    finally:
        b.broker.kill()


class Fleet:
    """cam-1 of group lab on the site broker, m v1 committed on it, the inventory signed: what the
    guide's reader runs before the guide's first rollout."""

    def __init__(self, sh: Workstation, site: AclBroker, pki: Pki, root: Path, agents: list[AgentProcess]):
        self.sh, self.site, self.pki, self.root, self.agents = sh, site, pki, root, agents
        self.cam1: AgentProcess | None = None

    def ready(self) -> AgentProcess:
        if self.cam1 is not None:
            return self.cam1
        work = self.sh.cwd
        assert (work / "keys" / "edgefleet.pub").exists(), "the guide makes keys/ before its first rollout"
        from edgefleet.testing.reliability import zoo_model

        for version, model in BUNDLES.items():
            self.edgectl("package", str(zoo_model(model)), "-o", f"bundles/m-v{version}", "--name", MODEL,
                         "--version", str(version), "--key", "keys/", "--interpreters", "none",
                         "--latency-runs", "5")
        password = self.root / "cam-1.password"
        password.write_text(self.site.passwords[DEVICE])
        cam1 = board(self.root / DEVICE, DEVICE, work / "keys", groups=[GROUP], telemetry={"interval_s": 1},
                     mqtt={"url": self.site.url, "username": DEVICE, "password_file": str(password),
                           "ca_file": str(self.pki.ca_file)})
        self.agents.append(cam1.start())
        self.cam1 = cam1
        self.sh.agent_config = cam1.config_path
        self.edgectl("inventory", "set", GROUP, DEVICE, "--key", "keys/")
        self.push(1)
        return cam1

    def edgectl(self, *args: str) -> str:
        cmd = Command("setup", ("edgectl", *args), " ".join(args))
        return self.sh.execute(Step(Block(GUIDE, 0, "sh", ""), cmd)).stdout

    def push(self, version: int) -> None:
        self.edgectl("push", f"bundles/m-v{version}", "--group", GROUP, "--key", "keys/", "--wait", "--timeout", "60")
        assert self.cam1 is not None
        assert committed(self.cam1, MODEL, version), model_state(self.cam1, MODEL)


# edgectl commands that need no fleet: local files, or the broker alone.
OFF_FLEET = {("completion",), ("profile",), ("keygen",), ("broker",), ("package",), ("convert",), ("inspect",),
             ("diff",)}

# Where the guide's story moves on between its blocks, before the first command of a kind.
BETWEEN: dict[tuple[str, ...], Callable[[Fleet], None]] = {
    # the status the manual rollback starts from shows v3 committed over v1; the remote rollback
    # needs a version to roll back from again
    ("edgectl", "rollback"): lambda fleet: fleet.push(3),
}


def _check(step: Step, res: subprocess.CompletedProcess[str], fleet: Fleet, sh: Workstation) -> None:
    """The lines the guide promises for a command, loosely: their shape, with this fleet's values."""
    out = res.stdout
    program, sub, args = step.command.program, step.sub, step.command.args
    where = f"{step.command.where}: `{step.command.text}`:\n{out}\n{res.stderr}"
    if program == "edge-agent" and sub == ("status",):
        assert out.startswith(f"device {DEVICE}: agent running"), where
        for line in step.output:
            m = re.match(r"\s+(\w[\w-]*): ([A-Z_]+)\s", line)
            if m and m[1] == MODEL:
                assert re.search(rf"^\s+{MODEL}: {m[2]}\s", out, re.M), where
            if re.match(r"\s+broker \S+: connected", line):
                assert re.search(r"^\s+broker mqtts://127\.0\.0\.1:\d+: connected", out, re.M), where
    elif program == "edge-agent" and sub == ("rollback",) and step.error is None:
        assert [line for line in step.output if line.strip()] == out.splitlines(), where
    elif program == "edgectl" and sub == ("push",) and "--json" in args:
        lines = [json.loads(line) for line in out.splitlines()]
        assert {d["event"] for d in lines[:-1]} == {"progress"} and lines[-1]["event"] == "summary", where
        assert lines[-1]["ok"] is True and lines[-1]["devices"][0]["verdict"] == "committed", where
    elif program == "edgectl" and sub == ("push",):
        assert re.search(rf"^pushed {MODEL} v2 \(deployment {MODEL}-v2-\w+\) to edgefleet/groups/{GROUP}/models/{MODEL}$",
                         out, re.M), where
        assert "waiting for 1 online device(s), up to 60 s" in out, where
        for phase in ("DOWNLOADING", "PROBATION"):
            assert re.search(rf"^device {DEVICE}: {phase}", out, re.M), where
        assert out.splitlines()[-1] == "1 committed, 0 failed, 0 unfinished, 0 pending", where
    elif sub == ("deployments", "list"):
        assert f"model {MODEL}" in out and f"device:{DEVICE}" in out and f"group:{GROUP}" in out, where
    elif sub == ("deployments", "withdraw"):
        assert f"withdrew the {MODEL} document for device:{DEVICE}: falls back to group:{GROUP} (v2" in out, where
    elif program == "edgectl" and sub == ("rollback",):
        assert re.search(rf"^rollback of {MODEL} sent to {DEVICE} \(command rollback-\w+\)$", out, re.M), where
        assert f"device {DEVICE}: rolled back" in out, where
        assert fleet.cam1 is not None and model_state(fleet.cam1, MODEL)["active"]["version"] == 1, where
    elif sub == ("broker", "check"):
        assert "has what edgefleet needs" in out.splitlines()[-1], where
        assert re.search(r"device ACL: other devices\s*│\s*ok", out), where
    elif sub == ("fleet", "status"):
        assert re.search(rf"│ {DEVICE}\s+│ yes", out) and "1 device(s), 1 online" in out, where
    elif sub == ("fleet", "watch"):
        assert re.search(rf"^{DEVICE}\s+yes\s+(?:{GROUP}\s+)?{MODEL}\s+v1\s+ROLLED_BACK", out, re.M), where
    elif sub == ("fleet", "history") and "prune" not in args:
        if "--until" in args:  # a past range: nothing was collected then
            assert DEVICE not in out, where
        elif "--json" in args:
            shown = json.loads(out)
            assert {"devices", "deployments"} <= set(shown) and DEVICE in json.dumps(shown["devices"]), where
        elif "--plot" in args:
            assert (sh.cwd / args[args.index("--plot") + 1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", where
        else:
            assert re.search(rf"^{DEVICE}\s+{MODEL}\s", out, re.M), where
    elif sub == ("logs",):
        assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (WARNING|ERROR|CRITICAL) edgefleet\.", out, re.M), where
    elif sub == ("completion",):
        shell = args[1]
        target = Path(args[args.index(">") + 1].replace("~", sh.env["HOME"], 1))
        assert "edgectl" in target.read_text() and "fleet" in target.read_text(), f"{where} ({shell})"
    elif sub == ("profile", "show") and "--json" in args:
        shown = json.loads(out)
        assert "lab-broker" in json.dumps(shown), where
    elif sub == ("profile", "show"):
        assert "site-a" in out and "127.0.0.1" in out and "site-a.password" in out, where
    elif sub == ("profile", "list"):
        assert "site-a" in out and GROUP in out, where
    elif sub == ("keygen",):
        assert (sh.cwd / "keys" / "edgefleet.key").exists(), where


def _telemetry_rows(db: Path) -> int:
    """cam-1's telemetry rows in a history database, 0 while it does not exist yet."""
    if not db.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            return int(conn.execute("SELECT count(*) FROM telemetry WHERE device_id = ?", (DEVICE,)).fetchone()[0])
    except sqlite3.Error:
        return 0


def _service(step: Step, sh: Workstation, fleet: Fleet) -> None:
    """Run a command that runs until stopped; let it do its work, then stop it as systemd or Ctrl-C would."""
    cam1 = fleet.ready()
    sub = step.sub
    if sub[:2] == ("fleet", "collect"):
        argv = sh.argv(step.command)
        if "--out" in argv:
            out = sh.cwd / argv[argv.index("--out") + 1]
            sh.service(step.command, lambda _: out.exists() and DEVICE in out.read_text(),
                       f"the collector to write cam-1's telemetry to {out}")
        else:
            given = argv[argv.index("--db") + 1:][:1] if "--db" in argv else []
            db = sh.cwd / given[0] if given and not given[0].startswith("-") else \
                Path(sh.env["XDG_DATA_HOME"]) / "edgefleet" / "history.sqlite"
            sh.service(step.command, lambda _: _telemetry_rows(db) > 0,
                       f"the collector to store cam-1's telemetry in {db}")
    elif sub[:1] == ("logs",):
        started = time.monotonic()
        sh.service(step.command, lambda _: time.monotonic() - started > 3, "logs --follow to run for 3 s")
    elif sub[:1] == ("timestamp",):
        sh.service(step.command, lambda _: bool((cam1.status()["state"].get("channel") or {}).get("fresh")),
                   "cam-1 to hold a fresh signed timestamp")
    else:
        shown = sh.service(step.command, lambda text: DEVICE in text, "a row for cam-1")
        assert MODEL in shown, shown


def test_operations_guide(tmp_path: Path, site: AclBroker, pki: Pki, agents: list[AgentProcess]) -> None:
    """The guide's commands in order, each exiting 0 (or failing with the error line its transcript
    shows), with the lines the guide promises for them."""
    work, home = tmp_path / "workstation", tmp_path / "home"
    work.mkdir()
    subs = substitutions(site, tmp_path / "var")
    sh = Workstation(work, home, subs)
    # what the reader has: the CA and password files the broker's README makes, and the guide's profile
    shutil.copy(pki.ca_file, work / "ca.pem")
    (work / "op.password").write_text(site.passwords[OPERATOR])
    (work / f"{SPARE}.password").write_text(site.passwords[SPARE])
    conf = home / ".config" / "edgefleet"
    conf.mkdir(parents=True)
    profile = profile_example()
    for old, new in subs.items():
        profile = profile.replace(old, new)
    (conf / "edgectl.toml").write_text(profile)
    shutil.copy(pki.ca_file, conf / "site-a-ca.pem")
    (conf / "site-a.password").write_text(site.passwords[OPERATOR])
    (conf / "keys").symlink_to(work / "keys")
    for sub in ("~/.local/share/bash-completion/completions", "~/.zfunc", "~/.config/fish/completions"):
        (home / sub[2:]).mkdir(parents=True, exist_ok=True)  # where the reader's shells look
    for folder in ("/var/log/edgefleet/", "/var/lib/edgefleet/"):
        Path(subs[folder]).mkdir(parents=True)  # the collector host's folders

    fleet = Fleet(sh, site, pki, tmp_path, agents)
    ran: list[tuple[str, ...]] = []
    for step in runnable_steps():
        key = (step.command.program, *step.sub[:1])
        if key in BETWEEN and key not in ran:
            BETWEEN[key](fleet)
        ran.append(key)
        if step.command.program == "edge-agent" or step.sub[:1] not in OFF_FLEET:
            fleet.ready()
        if step.follows():
            _service(step, sh, fleet)
            continue
        res = sh.execute(step)
        if step.error is None:
            _check(step, res, fleet, sh)
    assert {("edgectl", "push"), ("edge-agent", "rollback"), ("edgectl", "rollback"), ("edgectl", "broker"),
            ("edgectl", "profile"), ("edgectl", "completion")} <= set(ran), ran
    assert fleet.cam1 is not None and fleet.cam1.proc is not None and fleet.cam1.proc.poll() is None

