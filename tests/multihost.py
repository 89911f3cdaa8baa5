"""Several simulated hosts on one machine, for the multi-node tests (needs root: network namespaces).

Each host is a network namespace with one address on its `eth0` (198.18.0.N/24, a range reserved for network
tests); a bridge joins them, in a namespace of its own, so nothing is added to the machine's network. Every
command on a host runs in a fresh UTS namespace under the host's name. Names behave as on many clusters: a host
resolves its own name to 127.0.1.1 (a Debian-style /etc/hosts) and the other hosts' names not at all (no DNS).
The filesystem and the process table are the machine's, like a cluster's shared home.

`SimulatedHosts.agent` is the remote shell for launchers (Open MPI's `--prtemca plm_ssh_agent`): called as
`agent [ssh options] HOST COMMAND...`, it runs COMMAND on HOST (a name or an address) with the environment a
login shell gets (PATH with this Python's bin directory, HOME, LANG), as ssh does.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SUBNET = "198.18.0"
NETNS_CONFIG = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc/*


class HostsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no `ip`/`unshare`, a sandbox)."""


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    netns: str
    port: str  # the bridge port (in the switch namespace) that is this host's cable


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode:
        raise HostsUnavailable(f"ip {' '.join(args)}: {result.stderr.strip()}")


AGENT = r"""#!/bin/bash
# Remote shell for the simulated hosts: agent [ssh options] HOST COMMAND...
while [[ $1 == -* ]]; do
  case $1 in -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;; *) shift ;; esac
done
host=$1; shift
case $host in
{cases}
  *) echo "agent: no simulated host $host" >&2; exit 255 ;;
esac
echo "$name: $*" >> {log}
masks={masks}/$name
exec ip netns exec "$netns" unshare --uts env -i PATH={path} HOME={home} LANG=C.UTF-8 bash -c \
  "hostname $name; if [ -f $masks ]; then while read -r d; do mount -t tmpfs tmpfs \"\$d\"; done < $masks; fi; $*"
"""


class SimulatedHosts:
    """`count` hosts named host1, host2, ... at 198.18.0.1, 198.18.0.2, ...; `close()` removes everything."""

    def __init__(self, count: int, workdir: Path) -> None:
        prefix = f"gfmh{os.getpid()}"
        self.switch = f"{prefix}-sw"
        self.hosts = [Host(f"host{i}", f"{SUBNET}.{i}", f"{prefix}-h{i}", f"p{i}") for i in range(1, count + 1)]
        self.workdir = workdir
        self.agent = workdir / "agent"
        self.agent_log = workdir / "agent.log"
        self.masks = workdir / "masks"
        self._created: list[str] = []  # namespaces, in creation order
        self._inodes: dict[str, int] = {}  # namespace -> its nsfs inode, to find processes left in it

    # ---- set-up and tear-down -------------------------------------------------------------------------
    def start(self) -> None:
        """Create the namespaces, the bridge and the agent; on any failure remove what was made and raise."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        if os.geteuid() != 0:
            raise HostsUnavailable("network namespaces need root")
        missing = [tool for tool in ("ip", "unshare", "mount") if shutil.which(tool) is None]
        if missing:
            raise HostsUnavailable(f"{', '.join(missing)} not installed (iproute2, util-linux)")
        for netns in [self.switch] + [h.netns for h in self.hosts]:
            _ip("netns", "add", netns)
            self._created.append(netns)
            self._inodes[netns] = os.stat(f"/run/netns/{netns}").st_ino
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts:
            _ip("-n", self.switch, "link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns",
                host.netns)
            _ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            config = NETNS_CONFIG / host.netns
            config.mkdir(parents=True)
            (config / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {host.name}\n")
            (config / "resolv.conf").write_text("# no DNS on the simulated hosts\n")
        self.masks.mkdir(parents=True, exist_ok=True)
        cases = "\n".join(f"  {h.name}|{h.address}) netns={h.netns}; name={h.name} ;;" for h in self.hosts)
        path = f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        self.agent.write_text(AGENT.format(cases=cases, log=shlex.quote(str(self.agent_log)),
                                           masks=shlex.quote(str(self.masks)), path=shlex.quote(path),
                                           home=shlex.quote(os.environ.get("HOME", "/root"))))
        self.agent.chmod(0o755)
        self._wait_linked(self.hosts[-1])

    def close(self) -> None:
        """Kill every process on the hosts, delete the namespaces and their /etc/netns files (idempotent)."""
        for netns in reversed(self._created):
            self._kill_netns(netns)
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
            with contextlib.suppress(FileNotFoundError):
                for name in ("hosts", "resolv.conf"):
                    (NETNS_CONFIG / netns / name).unlink(missing_ok=True)
                (NETNS_CONFIG / netns).rmdir()
        self._created.clear()
        with contextlib.suppress(OSError):
            NETNS_CONFIG.rmdir()  # only if no one else has files there

    def leftovers(self) -> list[str]:
        """What `close()` should have removed and is still there (empty when all is clean)."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        left = [f"namespace {n}" for n in self._inodes if n in listed]
        left += [f"file {NETNS_CONFIG / n}" for n in self._inodes if (NETNS_CONFIG / n).exists()]
        for pid in self._pids_in(set(self._inodes.values())):
            left.append(f"process {pid} ({self._cmdline(pid)})")
        return left

    # ---- running and killing ----------------------------------------------------------------------------
    def command(self, host: Host, command: list[str], env: dict[str, str] | None = None) -> list[str]:
        """The command line that runs `command` on `host` with `env` added to a login environment."""
        assignments = [f"{k}={v}" for k, v in (env or {}).items()]
        return [str(self.agent), host.name, shlex.join(["env", *assignments, *command])]

    def popen(self, host: Host, command: list[str], output: Path, env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        """Start `command` on `host`, its stdout and stderr together into the file `output`."""
        with output.open("w") as f:
            return subprocess.Popen(self.command(host, command, env), stdout=f, stderr=subprocess.STDOUT)

    def run(self, host: Host, command: list[str], env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, command, env), capture_output=True, text=True, timeout=timeout)

    def pids(self, host: Host) -> list[int]:
        """The processes running on `host`."""
        return self._netns_pids(host.netns)

    def kill(self, host: Host) -> list[int]:
        """SIGKILL every process on `host` (as if it lost power); returns their pids."""
        return self._kill_netns(host.netns)

    def disconnect(self, host: Host) -> None:
        """Pull `host`'s cable: from now on nothing it sends arrives, and nothing reaches it."""
        _ip("-n", self.switch, "link", "set", host.port, "down")

    def reconnect(self, host: Host) -> None:
        """Plug `host` back in; returns when it reaches the first host again."""
        _ip("-n", self.switch, "link", "set", host.port, "up")
        for other in self.hosts:  # forget the neighbours that stopped answering while it was away
            _ip("-n", other.netns, "neigh", "flush", "dev", "eth0")
        self._wait_linked(host)

    def _wait_linked(self, host: Host, within_s: float = 30) -> None:
        """Wait until `host` reaches the first host (it answers on port 9, where nothing listens, with a refusal)."""
        probe = ("import socket, time\n"
                 f"for _ in range({int(within_s * 10)}):\n"
                 f"    try: socket.create_connection(('{self.hosts[0].address}', 9), timeout=1)\n"
                 "    except ConnectionRefusedError: raise SystemExit(0)\n"
                 "    except OSError: time.sleep(0.1)\n"
                 "raise SystemExit(1)\n")
        result = self.run(host, [sys.executable, "-c", probe], timeout=within_s + 30)
        if result.returncode:
            raise RuntimeError(f"{host.name} cannot reach {self.hosts[0].name} over the bridge: {result.stderr}")

    @contextlib.contextmanager
    def masked(self, host: Host, directory: Path):
        """Commands started on `host` in this block see an empty private tmpfs at `directory`, not the shared
        one (as a node-local disk mounted where the others have shared storage)."""
        mask = self.masks / host.name
        mask.write_text(f"{directory}\n")
        try:
            yield
        finally:
            mask.unlink()

    @staticmethod
    def _netns_pids(netns: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def _kill_netns(self, netns: str) -> list[int]:
        killed: list[int] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # again until none is left: a dying launcher may still fork
            pids = self._netns_pids(netns)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed += pids
            time.sleep(0.1)
        return sorted(set(killed))

    @staticmethod
    def _pids_in(inodes: set[int]) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(entry / "ns" / "net").st_ino in inodes:
                        found.append(int(entry.name))
        return found

    @staticmethod
    def _cmdline(pid: int) -> str:
        with contextlib.suppress(OSError):
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        return "?"
