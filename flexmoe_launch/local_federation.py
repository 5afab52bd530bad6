"""Start a local Flower federation on loopback: one SuperLink and N SuperNodes.

Each SuperNode declares its own expert capacity (and its data: a partition of the
run's dataset, or its own files) in its node config, as a deployed device would. The
federation is insecure, or uses TLS (``--tls``), optionally with SuperNode
authentication (``--auth``): certificates and keys are generated for the trial into
the work directory. The script writes a ``[superlink.<name>]`` entry to
``$FLWR_HOME/config.toml`` and prints the ``flwr run`` command that uses it.

    flexmoe-federation start /tmp/fed --nodes 3 --capacities 1,2,4
    flwr run . flexmoe-local --stream --run-config 'overrides="num_clients=3"'
    flexmoe-federation stop /tmp/fed

(``python -m flexmoe_launch.local_federation`` is the same command from a checkout.)

``add-node`` adds a SuperNode to a running federation (``--unregistered``: with a
key the SuperLink does not know, to see it refused). ``kill-node`` ends a SuperNode
and its ClientApp processes with SIGKILL, as a device that loses power; ``restart-node``
starts it again with the same node config (it gets a new Flower node id and claims
its client key back). ``stop`` ends every process the script started (their ids are in
``<workdir>/federation.json``) and removes the config entry. Everything listens on
127.0.0.1 only. A SuperNode counts as connected once ``flwr supernode list --format
json`` lists a new online node; its Flower node id is kept in the state file.

``stop-local`` stops the SuperLink that ``flwr run`` starts for local simulations, if it
is this user's, with this ``$FLWR_HOME``: it is found by its log file, which lies in
that Flower home, never by its name (another user's SuperLink is left alone).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomlkit

from .processes import (
    LOOPBACK,
    Target,
    alive,
    descendants,
    free_port,
    kill,
    start_time,
    stop,
    wait_for_health,
)

STATE_FILE = "federation.json"
DEFAULT_NAME = "flexmoe-local"
# Written when $FLWR_HOME/config.toml does not exist yet: Flower's own default entry
# for local simulations, so `flwr run .` keeps working next to ours.
DEFAULT_CONFIG = {"superlink": {"default": "local", "local": {"address": ":local:"}}}
# Where `flwr run` keeps the local simulation SuperLink's log, under $FLWR_HOME.
LOCAL_SUPERLINK_LOG = Path("local-superlink") / "superlink.log"


# ----------------------------------------------------------------- utilities
def flwr_home() -> Path:
    """Return the Flower CLI's home (``$FLWR_HOME``, default ``~/.flwr``)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def bin_dir() -> Path:
    """Return the folder of this interpreter's scripts (flower-superlink, flwr, ...)."""
    return Path(sys.executable).parent


def process_env(home: Path) -> dict[str, str]:
    """Return the environment of the processes started here."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    # The SuperLink starts `flower-superexec` by name: it must be on PATH.
    env["PATH"] = f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    # The app's dependencies are installed already; Flower must not `uv sync` them.
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    return env


def spawn(command: list[str], log_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """Start ``command`` in its own session, output to ``log_path``; return its record."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C in this shell does not reach it
        )
    return {
        "pid": process.pid,
        "start_time": start_time(process.pid),
        "command": command,
        "log": str(log_path),
    }


def load_state(workdir: Path) -> dict[str, Any]:
    """Return the federation's state file (raises SystemExit if there is none)."""
    path = workdir / STATE_FILE
    if not path.is_file():
        raise SystemExit(f"No federation in {workdir} (no {STATE_FILE}); start one first.")
    return json.loads(path.read_text())


def save_state(workdir: Path, state: dict[str, Any]) -> None:
    """Write the state file atomically (a stop running concurrently reads all or none)."""
    tmp = workdir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, workdir / STATE_FILE)


# -------------------------------------------------------------- TLS and keys
def make_certificates(cert_dir: Path, hosts: Sequence[str] = ()) -> dict[str, str]:
    """Generate a CA and a SuperLink certificate for 127.0.0.1, localhost and ``hosts``.

    For trials: a production SuperLink uses certificates from the organisation's CA.
    ``hosts`` are the addresses (IP or DNS name) devices reach the SuperLink at.

    Returns
    -------
    dict
        Paths of ``ca`` (the root certificate clients trust), ``cert`` and ``key``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    valid = (now - dt.timedelta(minutes=5), now + dt.timedelta(days=7))

    def name(common: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FLEX-MoE local trial"),
                x509.NameAttribute(NameOID.COMMON_NAME, common),
            ]
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("FLEX-MoE trial CA"))
        .issuer_name(name("FLEX-MoE trial CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(
            # The CLI and the SuperExec connect to 127.0.0.1; devices to ``hosts``.
            x509.SubjectAlternativeName([_subject(h) for h in (LOOPBACK, "localhost", *hosts)]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {k: cert_dir / f"{k}.pem" for k in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths["key"].chmod(0o600)
    return {k: str(v) for k, v in paths.items()}


def _subject(host: str) -> Any:
    import ipaddress

    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_node_key(key_dir: Path, label: str) -> dict[str, str]:
    """Generate a SuperNode's authentication key pair (ECDSA P-384, OpenSSH format)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = key_dir / label, key_dir / f"{label}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return {"private": str(private), "public": str(public)}


# ------------------------------------------------------------ config.toml entry
def write_connection(home: Path, name: str, entry: dict[str, Any] | None) -> Path:
    """Set (or with ``entry=None`` remove) ``[superlink.<name>]`` in ``home/config.toml``.

    The file is edited, not rewritten: its other entries, comments and layout stay.
    """
    path = home / "config.toml"
    config = tomlkit.parse(path.read_text()) if path.is_file() else tomlkit.item(DEFAULT_CONFIG)
    links = config.setdefault("superlink", tomlkit.table())
    if entry is None:
        links.pop(name, None)
    else:
        links[name] = entry
    home.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(tomlkit.dumps(config))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------- readiness
def wait_for_superlink(port: int, ca: str | None, timeout: float, record: dict) -> None:
    """Wait until the SuperLink answers ``/health`` (raises SystemExit on failure)."""

    def running() -> bool:
        return alive(record["pid"], record["start_time"])

    if wait_for_health(port, timeout, running, ca):
        return
    if not running():
        raise SystemExit(f"The SuperLink exited; see {record['log']}")
    raise SystemExit(f"The SuperLink did not answer within {timeout:.0f} s; see {record['log']}")


def list_nodes(state: dict[str, Any]) -> dict[int, tuple[str, str]]:
    """Return the SuperLink's SuperNodes: node id -> (status, online since).

    From ``flwr supernode list <connection> --format json``.
    """
    done = subprocess.run(
        [str(bin_dir() / "flwr"), "supernode", "list", state["name"], "--format", "json"],
        env=process_env(Path(state["cli_home"])),
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        nodes = json.loads(done.stdout)["nodes"]
        return {int(n["node-id"]): (str(n["status"]), str(n["online-at"])) for n in nodes}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise SystemExit(
            f"`flwr supernode list {state['name']} --format json` failed:\n"
            f"{done.stdout}{done.stderr}"
        ) from None


def online(state: dict[str, Any]) -> dict[int, str]:
    """Return the SuperNodes online now: node id -> when they came online."""
    return {n: since for n, (status, since) in list_nodes(state).items() if status == "online"}


def wait_for_node(
    state: dict[str, Any], record: dict, timeout: float, before: dict[int, str]
) -> str:
    """Wait until the SuperLink lists a new connection, or the SuperNode process exits.

    ``before``: :func:`online` just before the SuperNode started. A new connection is
    a node online now that was not then, or that came online again since (a node
    with an authentication key keeps its node id across restarts). The node's id is
    stored in ``record["node_id"]``.

    Returns
    -------
    str
        ``"connected"``, ``"exited"`` (e.g. refused by the SuperLink) or ``"timeout"``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(record["pid"], record["start_time"]):
            return "exited"
        new = [n for n, since in online(state).items() if before.get(n) != since]
        if new:
            record["node_id"] = new[0]
            return "connected"
        time.sleep(0.5)
    return "timeout"


# ------------------------------------------------------------------- commands
def node_config(args: argparse.Namespace, index: int, partition: int | None) -> str:
    """Return the ``--node-config`` string of one SuperNode."""
    items = [f"capacity={args.capacities[index % len(args.capacities)]}"]
    if args.data_path:
        path = args.data_path[index % len(args.data_path)]
        items += [f"client-id={index}", f"data-path={json.dumps(str(path))}"]
        if args.data_format:
            items.append(f"data-format={json.dumps(args.data_format)}")
    else:
        assert partition is not None
        items += [f"partition-id={partition}", f"num-partitions={args.num_partitions}"]
    if args.state_dir:
        items.append(f"state-dir={json.dumps(str(Path(args.state_dir).resolve()))}")
    return " ".join(items)


def start_node(
    workdir: Path,
    state: dict[str, Any],
    config: str,
    label: str,
    register: bool,
    timeout: float,
) -> dict[str, Any]:
    """Start one SuperNode (registering its key first when auth is on)."""
    env = process_env(Path(state["home"]))
    command = [str(bin_dir() / "flower-supernode")]
    command += ["--root-certificates", state["tls"]["ca"]] if state["tls"] else ["--insecure"]
    command += ["--superlink", f"{LOOPBACK}:{state['port']}", "--port", str(free_port())]
    command += ["--node-config", config]
    if state["auth"]:
        keys = make_node_key(workdir / "keys", label)
        command += ["--auth-supernode-private-key", keys["private"]]
        if register:
            done = subprocess.run(
                [str(bin_dir() / "flwr"), "supernode", "register", keys["public"], state["name"]],
                env={**process_env(Path(state["cli_home"]))},
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode != 0:
                raise SystemExit(
                    f"Registering {label}'s public key failed:\n{done.stdout}{done.stderr}"
                )
    before = online(state)
    record = spawn(command, workdir / "logs" / f"{label}.log", env)
    record.update(role="supernode", label=label, node_config=config, registered=register)
    state["processes"].append(record)
    save_state(workdir, state)
    record["status"] = wait_for_node(state, record, timeout, before)
    save_state(workdir, state)
    return record


def cmd_start(args: argparse.Namespace) -> int:
    """Start the SuperLink and the SuperNodes; print how to run the app on them."""
    workdir = Path(args.workdir).expanduser().resolve()
    if (workdir / STATE_FILE).is_file():
        state = json.loads((workdir / STATE_FILE).read_text())
        if any(alive(p["pid"], p["start_time"]) for p in state["processes"]):
            raise SystemExit(f"A federation is already running in {workdir}; stop it first.")
    workdir.mkdir(parents=True, exist_ok=True)
    tls = args.tls or args.auth
    state: dict[str, Any] = {
        "name": args.name,
        "port": free_port(),
        "home": str(workdir / "flwr-home"),  # apps the SuperLink/SuperNodes install
        "cli_home": str(flwr_home()),  # where `flwr` finds the connection entry
        "tls": make_certificates(workdir / "certs") if tls else None,
        "auth": bool(args.auth),
        "processes": [],
    }
    command = [
        str(bin_dir() / "flower-superlink"),
        "--host",
        LOOPBACK,
        "--port",
        str(state["port"]),
    ]
    if tls:
        tls_files = state["tls"]
        command += ["--ssl-ca-certfile", tls_files["ca"], "--ssl-certfile", tls_files["cert"]]
        command += ["--ssl-keyfile", tls_files["key"]]
    else:
        command.append("--insecure")
    if args.auth:
        command.append("--enable-supernode-auth")
    superlink = spawn(command, workdir / "logs" / "superlink.log", process_env(Path(state["home"])))
    superlink["role"] = "superlink"
    state["processes"].append(superlink)
    save_state(workdir, state)
    wait_for_superlink(state["port"], tls and state["tls"]["ca"], args.timeout, superlink)

    entry: dict[str, Any] = {"address": f"{LOOPBACK}:{state['port']}"}
    entry.update({"root-certificates": state["tls"]["ca"]} if tls else {"insecure": True})
    config_path = write_connection(Path(state["cli_home"]), args.name, entry)
    state["config_toml"] = str(config_path)
    save_state(workdir, state)

    failed = []
    for index in range(args.nodes):
        partition = None if args.data_path else index
        record = start_node(
            workdir, state, node_config(args, index, partition), f"node-{index}", True, args.timeout
        )
        if record["status"] != "connected":
            failed.append(f"{record['label']} ({record['status']}, see {record['log']})")
    overrides = f"num_clients={args.nodes}"
    security = "insecure"
    if tls:
        security = "TLS + SuperNode authentication" if args.auth else "TLS"
    print(f"SuperLink ({security}) on {LOOPBACK}:{state['port']}; {args.nodes} SuperNodes")
    print(f"Logs and pids in {workdir}")
    print(f"Connection [superlink.{args.name}] written to {config_path}")
    print("Run the app on it (from the project folder):")
    print(f"  flwr run . {args.name} --stream --run-config 'overrides=\"{overrides}\"'")
    print(f"Follow runs: flwr ls {args.name}; flwr log <run-id> {args.name} --stream")
    print(f"Stop a run: flwr stop <run-id> {args.name}")
    print(f"Stop the federation: flexmoe-federation stop {shlex.quote(str(workdir))}")
    if failed:
        print("SuperNodes that did not connect: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    """Write a trial CA and a SuperLink certificate for the given addresses."""
    paths = make_certificates(Path(args.dir).expanduser().resolve(), args.host)
    print(f"CA (give it to every device and to flwr): {paths['ca']}")
    print(f"SuperLink certificate and key: {paths['cert']}, {paths['key']}")
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    """Add (or replace) a SuperLink connection in $FLWR_HOME/config.toml for flwr."""
    entry: dict[str, Any] = {"address": args.address}
    if args.root_certificates:
        entry["root-certificates"] = str(Path(args.root_certificates).expanduser().resolve())
    else:
        entry["insecure"] = True
    path = write_connection(flwr_home(), args.name, entry)
    print(f"Connection [superlink.{args.name}] written to {path}")
    return 0


def cmd_add_node(args: argparse.Namespace) -> int:
    """Add a SuperNode to the running federation (``--unregistered``: an unknown key)."""
    workdir = Path(args.workdir).expanduser().resolve()
    state = load_state(workdir)
    index = sum(1 for p in state["processes"] if p["role"] == "supernode")
    items = [f"capacity={args.capacity}"]
    if args.data_path:
        items += [f"client-id={args.client_id if args.client_id is not None else index}"]
        items.append(f"data-path={json.dumps(str(args.data_path))}")
        if args.data_format:
            items.append(f"data-format={json.dumps(args.data_format)}")
    else:
        pid = args.partition_id if args.partition_id is not None else index
        items += [f"partition-id={pid}", f"num-partitions={args.num_partitions}"]
    label = f"node-{index}" + ("-unregistered" if args.unregistered else "")
    record = start_node(workdir, state, " ".join(items), label, not args.unregistered, args.timeout)
    print(f"{label}: {record['status']} (log: {record['log']})")
    return 0 if record["status"] == "connected" else 1


def find_node(state: dict[str, Any], label: str) -> dict[str, Any]:
    """Return the newest SuperNode record started as ``label`` (raises SystemExit if none)."""
    records = [p for p in state["processes"] if p.get("label") == label]
    if not records:
        labels = sorted({p["label"] for p in state["processes"] if "label" in p})
        raise SystemExit(f"No SuperNode {label!r} here; known: {', '.join(labels)}")
    return records[-1]


def cmd_kill_node(args: argparse.Namespace) -> int:
    """SIGKILL a SuperNode and its children at once: no goodbye to the SuperLink."""
    state = load_state(Path(args.workdir).expanduser().resolve())
    record = find_node(state, args.label)
    if not alive(record["pid"], record["start_time"]):
        print(f"{args.label} is not running")
        return 1
    targets = [(c, start_time(c)) for c in descendants(record["pid"])]
    targets.insert(0, (record["pid"], record["start_time"]))
    kill(targets)
    print(f"{args.label}: killed (pid {record['pid']} and {len(targets) - 1} children)")
    return 0


def cmd_restart_node(args: argparse.Namespace) -> int:
    """Start a stopped SuperNode again with its node config (and its key, with auth)."""
    workdir = Path(args.workdir).expanduser().resolve()
    state = load_state(workdir)
    record = find_node(state, args.label)
    if alive(record["pid"], record["start_time"]):
        raise SystemExit(f"{args.label} is still running; kill-node it first")
    command = list(record["command"])
    command[command.index("--port") + 1] = str(free_port())
    before = online(state)
    restarted = spawn(command, Path(record["log"]), process_env(Path(state["home"])))
    restarted.update(
        role="supernode", label=args.label, node_config=record["node_config"], registered=True
    )
    state["processes"].append(restarted)
    save_state(workdir, state)
    restarted["status"] = wait_for_node(state, restarted, args.timeout, before)
    save_state(workdir, state)
    print(f"{args.label}: {restarted['status']} (log: {restarted['log']})")
    return 0 if restarted["status"] == "connected" else 1


def stop_processes(state: dict[str, Any], grace: float = 10.0) -> list[int]:
    """End every process of ``state`` and their descendants; return the pids signalled.

    A recorded pid is only signalled if it is still the process that was started
    (same start time), so a recycled pid of someone else's process is left alone.
    """
    targets: list[Target] = []
    # SuperNodes first, so they do not log connection errors for the SuperLink.
    for record in sorted(state["processes"], key=lambda r: r["role"] == "superlink"):
        if alive(record["pid"], record["start_time"]):
            targets += [(child, start_time(child)) for child in descendants(record["pid"])]
            targets.append((record["pid"], record["start_time"]))
    stop(targets, grace)
    return [pid for pid, _ in targets]


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop what ``start``/``add-node`` started and remove the config entry."""
    workdir = Path(args.workdir).expanduser().resolve()
    state = load_state(workdir)
    stopped = stop_processes(state)
    if state.get("config_toml"):
        write_connection(Path(state["cli_home"]), state["name"], None)
    still = [p["pid"] for p in state["processes"] if alive(p["pid"], p["start_time"])]
    print(f"Stopped {len(stopped)} process(es)" + (f"; still running: {still}" if still else ""))
    return 1 if still else 0


def local_superlinks(home: Path) -> list[int]:
    """Return the pids of this user's ``flower-superlink`` logging to ``home``'s local log.

    That is the SuperLink ``flwr run`` starts for local simulations with
    ``FLWR_HOME=home``; its command line names the log file.
    """
    log = str(home / LOCAL_SUPERLINK_LOG)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if any(Path(w).name == "flower-superlink" for w in words[:2]) and log in words:
            found.append(int(entry.name))
    return found


def cmd_stop_local(args: argparse.Namespace) -> int:
    """Stop the local simulation SuperLink of this ``$FLWR_HOME`` (and its children)."""
    home = flwr_home()
    pids = local_superlinks(home)
    if not pids:
        print(f"No local SuperLink of FLWR_HOME={home} is running")
        return 0
    processes = [{"pid": p, "start_time": start_time(p), "role": "superlink"} for p in pids]
    stopped = stop_processes({"processes": processes})
    print(f"Stopped the local SuperLink of FLWR_HOME={home} (pids {', '.join(map(str, stopped))})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print each started process and whether it still runs."""
    state = load_state(Path(args.workdir).expanduser().resolve())
    for record in state["processes"]:
        running = alive(record["pid"], record["start_time"])
        label = record.get("label", record["role"])
        node = f" node {record['node_id']}" if "node_id" in record else ""
        print(f"{label:24s} pid {record['pid']:>7d} {'running' if running else 'stopped'}{node}")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    start = sub.add_parser("start", help="start a SuperLink and SuperNodes")
    start.add_argument("workdir", help="folder for certificates, keys, logs and pids")
    start.add_argument("--nodes", type=int, default=3)
    start.add_argument(
        "--capacities",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[1, 2, 4],
        help="expert capacity per SuperNode, cycled (default 1,2,4)",
    )
    start.add_argument("--num-partitions", type=int, default=None, help="default: --nodes")
    start.add_argument(
        "--data-path",
        action="append",
        help="a SuperNode's own data (repeat per node, cycled) instead of partitions",
    )
    start.add_argument("--data-format", help="format of --data-path files (e.g. imagefolder)")
    start.add_argument("--state-dir", help="node-local folder for the clients' gate versions")
    start.add_argument("--name", default=DEFAULT_NAME, help="connection name in config.toml")
    start.add_argument("--tls", action="store_true", help="TLS with a trial CA")
    start.add_argument("--auth", action="store_true", help="TLS + SuperNode authentication")
    start.add_argument("--timeout", type=float, default=90.0, help="seconds to wait per process")

    add = sub.add_parser("add-node", help="add a SuperNode to a running federation")
    add.add_argument("workdir")
    add.add_argument("--capacity", default="2", help="node config capacity (any text)")
    add.add_argument("--partition-id", type=int)
    add.add_argument("--num-partitions", type=int, default=3)
    add.add_argument("--client-id", type=int)
    add.add_argument("--data-path")
    add.add_argument("--data-format")
    add.add_argument("--unregistered", action="store_true", help="do not register its key")
    add.add_argument("--timeout", type=float, default=90.0)

    kill = sub.add_parser("kill-node", help="SIGKILL a SuperNode (a device losing power)")
    kill.add_argument("workdir")
    kill.add_argument("label", help="the SuperNode's label, e.g. node-1")
    restart = sub.add_parser("restart-node", help="start a killed SuperNode again, same config")
    restart.add_argument("workdir")
    restart.add_argument("label")
    restart.add_argument("--timeout", type=float, default=90.0)

    stop = sub.add_parser("stop", help="stop everything this script started there")
    stop.add_argument("workdir")
    status = sub.add_parser("status", help="list the processes started there")
    status.add_argument("workdir")
    certs = sub.add_parser("certs", help="write a trial CA and SuperLink certificate")
    certs.add_argument("dir", help="folder for ca.pem, cert.pem and key.pem")
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        help="an address devices reach the SuperLink at (repeatable)",
    )
    connect = sub.add_parser("connect", help="add a SuperLink connection for flwr")
    connect.add_argument("name", help="the connection's name (flwr run . <name>)")
    connect.add_argument("address", help="the SuperLink's host:port")
    connect.add_argument("--root-certificates", help="the CA of its TLS certificate")
    sub.add_parser(
        "stop-local",
        help="stop the SuperLink `flwr run` started for local simulations ($FLWR_HOME's)",
    )
    args = parser.parse_args(argv)
    if args.command == "start":
        if args.nodes < 1:
            parser.error("--nodes must be at least 1")
        args.num_partitions = args.num_partitions or args.nodes
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the subcommand."""
    args = parse_args(argv)
    commands = {"start": cmd_start, "add-node": cmd_add_node, "stop": cmd_stop}
    commands |= {"status": cmd_status, "kill-node": cmd_kill_node}
    commands["restart-node"] = cmd_restart_node
    commands["stop-local"] = cmd_stop_local
    commands |= {"certs": cmd_certs, "connect": cmd_connect}
    try:
        return commands[args.command](args)
    except (SystemExit, Exception):
        if args.command == "start" and (Path(args.workdir) / STATE_FILE).is_file():
            # A half-started federation must not be left running, whatever stopped it.
            stop_processes(load_state(Path(args.workdir).expanduser().resolve()))
        raise


if __name__ == "__main__":
    sys.exit(main())
