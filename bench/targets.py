"""What the load generator talks to: the backends directly, discoproxy, HAProxy or nginx.

Every target exposes one port per kind of traffic (:class:`Ports`) and, when it is a
proxy, the pid whose CPU time and RSS are measured. Proxies run pinned to the proxy
core; the backends and the load generator share the other one.

- **direct** — no proxy: client and backends alone, the load generator's own limit.
- **discoproxy** — ``discoproxy serve`` as a child (``python -m discoproxy``, so the pid
  is the proxy's own), one port, routing every scenario by name through server files;
  two of them route status pings to the mcstatus backend, one cached for
  ``PING_CACHED_TTL`` seconds, one with ``status_cache_ttl = 0``.
  ``log_level = "WARNING"`` (no per-connection line); the ``discoproxy-info`` variant
  logs one line per connection to a file, to show what that costs. Each also has two
  *port routes* (issue 6) in one more server file: a TCP port to the sink backend and a
  UDP port to the UDP echo backend, bound on 127.0.0.1 (``port_routes_bind``). With
  the benchmark's certificate (:func:`make_certificate`, issue 8) one more server file,
  ``tlsterm.toml``, terminates TLS for ``TLS_NAME`` (``tls = {cert, key}``) and forwards
  the plaintext to the reply backend, on the same one port.
- **haproxy-*** — Debian's HAProxy in ``mode tcp``, one frontend per kind of traffic; the
  SNI frontend routes on ``req_ssl_sni`` as discoproxy does. Variants: ``default``,
  ``splice`` (kernel splicing forced both ways with 1 MiB pipes) and ``bigbuf``
  (256 KiB buffers). "HAProxy-best" is the best variant per metric. Its ``bulk``
  frontend (``default_backend``, nothing read first) is a port route in effect, and
  serves the port-route bulk scenario too. With the certificate, ``haproxy-default``
  alone also has a ``tlsterm`` frontend, ``bind … ssl crt`` (cert and key in one PEM),
  routing on ``ssl_fc_sni`` to the reply backend.
- **nginx** — Debian's nginx with the stream module (``libnginx-mod-stream``), one
  process doing all the work (``master_process off``), a ``stream {}`` block with a TCP
  server to the sink and a UDP server (``listen … udp``) to the UDP echo: port routes
  only, it measures no other scenario.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from bench.payloads import (
    BULK_NAME,
    ECHO_NAME,
    PING_CACHED_NAME,
    PING_CACHED_TTL,
    PING_UNCACHED_NAME,
    POOL_LC_NAME,
    POOL_RR_NAME,
    REPLY,
    SNI_NAME,
    STATUS_NAME,
    TLS_NAME,
    client_hello,
)
from bench.procs import STARTUP_TIMEOUT_S, Child, free_port

# Lines added to HAProxy's global and defaults sections per variant.
HAPROXY_TUNING: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    # maxpipes defaults to maxconn / 4, two fds each: more than the fd limit leaves
    # next to 10k connections; 64 pipes serve the 8 bulk streams
    "splice": (
        ("tune.pipesize 1048576", "maxpipes 64"),
        ("option splice-request", "option splice-response"),
    ),
    "bigbuf": (("tune.bufsize 262144",), ()),
}
HAPROXY_CONFIG = textwrap.dedent("""\
    global
        maxconn {maxconn}
    {global_tuning}
    defaults
        mode tcp
        timeout connect 5s
        timeout client 600s
        timeout server 600s
    {defaults_tuning}
    frontend bulk
        bind 127.0.0.1:{bulk}
        default_backend sink

    frontend sni
        bind 127.0.0.1:{sni}
        tcp-request inspect-delay 5s
        tcp-request content accept if {{ req_ssl_hello_type 1 }}
        use_backend reply if {{ req_ssl_sni -i {sni_name} }}
        use_backend pool_rr if {{ req_ssl_sni -i {pool_rr_name} }}
        use_backend pool_lc if {{ req_ssl_sni -i {pool_lc_name} }}

    frontend echo
        bind 127.0.0.1:{echo}
        default_backend echo

    {tlsterm_frontend}
    backend sink
        server sink 127.0.0.1:{sink_backend}

    backend reply
        server reply 127.0.0.1:{reply_backend}

    backend echo
        server echo 127.0.0.1:{echo_backend}

    backend pool_rr
        balance roundrobin
        server r1 127.0.0.1:{reply_backend} check inter 1s fall 2
        server r2 127.0.0.1:{reply2_backend} check inter 1s fall 2
        server r3 127.0.0.1:{reply3_backend} check inter 1s fall 2

    backend pool_lc
        balance leastconn
        server r1 127.0.0.1:{reply_backend} check inter 1s fall 2
        server r2 127.0.0.1:{reply2_backend} check inter 1s fall 2
        server r3 127.0.0.1:{reply3_backend} check inter 1s fall 2
""")
# TLS termination (issue 8): HAProxy completes the handshake with the certificate and
# key in one PEM and routes the plaintext by the SNI it was given, as discoproxy does
HAPROXY_TLSTERM = textwrap.dedent("""\
    frontend tlsterm
        bind 127.0.0.1:{port} ssl crt {pem}
        use_backend reply if {{ ssl_fc_sni -i {name} }}
""")
# the benchmark's self-signed certificate: ECDSA P-256, valid long enough for any run
CERT_DAYS = 7
# well above the ~10,000 idle connections scenario 5 holds, as HAProxy's maxconn
DISCOPROXY_MAX_CONNECTIONS = 30_000
# discoproxy's default udp_session_timeout, for nginx's UDP sessions
UDP_SESSION_TIMEOUT_S = 60
NGINX_CONFIG = textwrap.dedent("""\
    {load_module}
    worker_processes 1;
    pid {workdir}/nginx.pid;
    error_log {workdir}/error.log warn;

    events {{
        worker_connections 4096;
    }}

    stream {{
        server {{
            listen 127.0.0.1:{tcp};
            proxy_pass 127.0.0.1:{sink_backend};
            # the client's FIN goes on to the sink and the byte count comes back
            # (without it nginx closes both sides at the client's EOF; nginx >= 1.21.4)
            proxy_half_close on;
        }}

        server {{
            listen 127.0.0.1:{udp} udp;
            proxy_pass 127.0.0.1:{udp_echo_backend};
            proxy_timeout {udp_timeout}s;
        }}
    }}
""")
# proxy_half_close, which the bulk sink's byte count needs, came with 1.21.4
NGINX_MIN_VERSION = (1, 21, 4)
# where Debian, Fedora and nginx.org's packages put dynamic modules
NGINX_MODULE_DIRS = (
    "/usr/lib/nginx/modules",
    "/usr/share/nginx/modules",
    "/usr/lib64/nginx/modules",
    "/etc/nginx/modules",
)


@dataclass(frozen=True)
class Ports:
    """Where a client connects for each kind of traffic (None: this target has none)."""

    bulk: int
    sni: int
    status: int | None
    echo: int
    mcstatus: int | None = None  # status pings answered by a Minecraft server (or for it)
    portbulk: int | None = None  # TCP to the sink, forwarded without reading a name
    udp: int | None = None  # UDP to the UDP echo
    tlsterm: int | None = None  # TLS terminated by the proxy, plaintext to the reply backend


@dataclass(frozen=True)
class Certificate:
    """The benchmark's self-signed certificate for ``TLS_NAME``: PEM files, and both in
    one (HAProxy's ``crt``)."""

    cert: Path
    key: Path
    combined: Path


def make_certificate(workdir: Path) -> Certificate | str:
    """A self-signed ECDSA P-256 certificate for ``TLS_NAME`` (CN and SAN), made with the
    openssl CLI in ``workdir``; why not (for the notes under the table) when it cannot be."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return "openssl not installed (the tlsterm certificate): apt-get install openssl"
    directory = workdir / "tls"
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    argv = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    argv += ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", str(CERT_DAYS)]
    argv += ["-subj", f"/CN={TLS_NAME}", "-addext", f"subjectAltName=DNS:{TLS_NAME}"]
    try:
        made = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"openssl failed to make the tlsterm certificate: {exc}"
    if made.returncode != 0 or not cert.exists() or not key.exists():
        return f"openssl failed to make the tlsterm certificate: {made.stderr.strip()[:300]}"
    combined = directory / "combined.pem"
    combined.write_text(cert.read_text() + key.read_text())
    return Certificate(cert, key, combined)


@dataclass(frozen=True)
class BackendPorts:
    sink: int
    reply: int
    echo: int
    mcstatus: int
    udp_echo: int
    reply2: int  # with reply: the 3-backend pools
    reply3: int


class Target:
    """A thing clients connect to; ``pid`` is None when nothing sits in between."""

    name = "direct"

    def __init__(self, backends: BackendPorts) -> None:
        self.backends = backends
        self.ports = Ports(
            backends.sink,
            backends.reply,
            backends.reply,
            backends.echo,
            backends.mcstatus,
            portbulk=backends.sink,
            udp=backends.udp_echo,
        )
        self.child: Child | None = None

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    def start(self) -> None:
        """Nothing to start for direct; proxies start, then prove they route."""

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _check_routes(self) -> None:
        """One SNI connection must come back with the reply backend's answer."""
        with socket.create_connection(("127.0.0.1", self.ports.sni), timeout=5) as sock:
            sock.sendall(client_hello())
            got = b""
            while len(got) < len(REPLY):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                got += chunk
        if got != REPLY:
            output = self.child.output() if self.child else ""
            raise RuntimeError(f"{self.name} does not route SNI {SNI_NAME}: {got!r}\n{output}")

    def _check_udp(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """A datagram to the UDP port must come back from the UDP echo; retried until
        ``timeout``, since a port route's listener opens a moment after the proxy."""
        assert self.ports.udp is not None
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("127.0.0.1", self.ports.udp))
            sock.settimeout(0.2)
            while True:
                if self.child is not None:
                    self.child.check_alive()
                try:
                    sock.send(b"udp check")
                    if sock.recv(64) == b"udp check":
                        return
                except OSError:  # nothing bound yet (ICMP port unreachable), or a timeout
                    pass
                if time.monotonic() > deadline:
                    output = self.child.output() if self.child else ""
                    raise RuntimeError(
                        f"{self.name}: no echo through UDP port {self.ports.udp}\n{output}"
                    )


class Discoproxy(Target):
    """``discoproxy serve`` with one server file per backend, all on one port, one more
    with a TCP and a UDP port route (``ports.toml``) and, given a certificate, one that
    terminates TLS (``tlsterm.toml``)."""

    def __init__(
        self,
        backends: BackendPorts,
        workdir: Path,
        cpu: int | None,
        log_level: str,
        certificate: Certificate | None = None,
    ) -> None:
        super().__init__(backends)
        self.certificate = certificate
        self.name = "discoproxy" if log_level == "WARNING" else f"discoproxy-{log_level.lower()}"
        self.workdir = workdir / self.name
        self.cpu = cpu
        self.log_level = log_level
        port = free_port()
        self.ports = Ports(
            port,
            port,
            port,
            port,
            port,
            portbulk=free_port(),
            udp=free_port(socket.SOCK_DGRAM),
            tlsterm=port if certificate is not None else None,
        )
        self._write_config()

    def _write_config(self) -> None:
        servers = self.workdir / "servers"
        servers.mkdir(parents=True, exist_ok=True)
        b = self.backends
        # server id: domains, backend port, extra lines
        routes = {
            "bulk": ([BULK_NAME], b.sink, ""),
            "reply": ([SNI_NAME, STATUS_NAME], b.reply, ""),
            "echo": ([ECHO_NAME], b.echo, ""),
            "ping-cached": (
                [PING_CACHED_NAME],
                b.mcstatus,
                f"status_cache_ttl = {PING_CACHED_TTL}\n",
            ),
            "ping-uncached": ([PING_UNCACHED_NAME], b.mcstatus, "status_cache_ttl = 0\n"),
        }
        for server_id, (domains, port, extra) in routes.items():
            # a JSON array of strings is a TOML array too
            addresses = json.dumps([f"127.0.0.1:{port}"])
            (servers / f"{server_id}.toml").write_text(
                f"domains = {json.dumps(domains)}\naddresses = {addresses}\n{extra}"
            )
        # the 3-backend pools, checked as HAProxy's (check inter 1s fall 2)
        pool = json.dumps([f"127.0.0.1:{port}" for port in (b.reply, b.reply2, b.reply3)])
        check = "health_check = { type = 'tcp', interval = 1, fall = 2 }\n"
        for server_id, name, balance in (
            ("pool-rr", POOL_RR_NAME, "round_robin"),
            ("pool-lc", POOL_LC_NAME, "least_connections"),
        ):
            (servers / f"{server_id}.toml").write_text(
                f"domains = {json.dumps([name])}\naddresses = {pool}\n"
                f"balance = '{balance}'\n{check}"
            )
        if self.certificate is not None:  # TLS terminated, plaintext to the reply backend
            tls = (
                f"tls = {{ cert = {json.dumps(str(self.certificate.cert))}, "
                f"key = {json.dumps(str(self.certificate.key))} }}\n"
            )
            (servers / "tlsterm.toml").write_text(
                f"domains = {json.dumps([TLS_NAME])}\n"
                f"addresses = {json.dumps([f'127.0.0.1:{b.reply}'])}\n{tls}"
            )
        # port routes: listen port:backend port, on each address's host
        port_routes = [f"{self.ports.portbulk}:{b.sink}/tcp", f"{self.ports.udp}:{b.udp_echo}/udp"]
        (servers / "ports.toml").write_text(
            f'addresses = ["127.0.0.1"]\nports = {json.dumps(port_routes)}\n'
        )
        (self.workdir / "discoproxy.toml").write_text(
            textwrap.dedent(f"""\
                bind = "127.0.0.1:{self.ports.sni}"
                servers_dir = "{servers}"
                log_level = "{self.log_level}"
                max_connections = {DISCOPROXY_MAX_CONNECTIONS}
                port_routes_bind = "127.0.0.1"

                [admin]  # on, as deployed (its history sampler runs), on a free port
                listen = "127.0.0.1:0"
            """)
        )

    def start(self) -> None:
        argv = [sys.executable, "-m", "discoproxy", "serve", "--config"]
        argv.append(str(self.workdir / "discoproxy.toml"))
        self.child = Child(self.name, argv, self.workdir / "proxy.log", cpu=self.cpu)
        self.child.wait_for_port(self.ports.sni)
        self._check_routes()
        assert self.ports.portbulk is not None
        self.child.wait_for_port(self.ports.portbulk)
        self._check_udp()


class HAProxy(Target):
    """HAProxy in ``mode tcp`` with one frontend per kind of traffic, as one variant;
    given a certificate, a TLS-terminating frontend too."""

    def __init__(
        self,
        backends: BackendPorts,
        workdir: Path,
        cpu: int | None,
        variant: str,
        maxconn: int,
        certificate: Certificate | None = None,
    ) -> None:
        super().__init__(backends)
        self.certificate = certificate
        self.name = f"haproxy-{variant}"
        self.workdir = workdir / self.name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cpu = cpu
        self.variant = variant
        self.maxconn = maxconn
        bulk = free_port()
        tlsterm = free_port() if certificate is not None else None
        self.ports = Ports(bulk, free_port(), None, free_port(), portbulk=bulk, tlsterm=tlsterm)
        self._write_config()

    def _write_config(self) -> None:
        global_tuning, defaults_tuning = HAPROXY_TUNING[self.variant]
        tlsterm = ""
        if self.certificate is not None:
            tlsterm = HAPROXY_TLSTERM.format(
                port=self.ports.tlsterm, pem=self.certificate.combined, name=TLS_NAME
            )
        text = HAPROXY_CONFIG.format(
            maxconn=self.maxconn,
            global_tuning="".join(f"    {line}\n" for line in global_tuning),
            defaults_tuning="".join(f"    {line}\n" for line in defaults_tuning),
            bulk=self.ports.bulk,
            sni=self.ports.sni,
            echo=self.ports.echo,
            sni_name=SNI_NAME,
            pool_rr_name=POOL_RR_NAME,
            pool_lc_name=POOL_LC_NAME,
            reply2_backend=self.backends.reply2,
            reply3_backend=self.backends.reply3,
            sink_backend=self.backends.sink,
            reply_backend=self.backends.reply,
            echo_backend=self.backends.echo,
            tlsterm_frontend=tlsterm,
        )
        (self.workdir / "haproxy.cfg").write_text(text)

    def start(self) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        argv = [binary, "-db", "-f", str(self.workdir / "haproxy.cfg")]
        self.child = Child(self.name, argv, self.workdir / "proxy.log", cpu=self.cpu)
        for port in (self.ports.bulk, self.ports.sni, self.ports.echo, self.ports.tlsterm):
            if port is not None:
                self.child.wait_for_port(port)
        self._check_routes()


def haproxy_available() -> bool:
    return shutil.which("haproxy") is not None or Path("/usr/sbin/haproxy").exists()


class Nginx(Target):
    """nginx's stream module: a TCP server to the sink, a UDP server to the UDP echo."""

    name = "nginx"

    def __init__(
        self, backends: BackendPorts, workdir: Path, cpu: int | None, binary: str, module: str
    ) -> None:
        super().__init__(backends)
        self.workdir = workdir / self.name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cpu = cpu
        self.binary = binary
        tcp = free_port()
        # no port for the name-routed scenarios: nginx is measured on port routes only
        self.ports = Ports(tcp, 0, None, 0, portbulk=tcp, udp=free_port(socket.SOCK_DGRAM))
        self.config = self.workdir / "nginx.conf"
        self.config.write_text(
            NGINX_CONFIG.format(
                load_module=f"load_module {module};" if module else "",
                workdir=self.workdir,
                tcp=self.ports.portbulk,
                sink_backend=backends.sink,
                udp=self.ports.udp,
                udp_echo_backend=backends.udp_echo,
                udp_timeout=UDP_SESSION_TIMEOUT_S,
            )
        )

    def start(self) -> None:
        # master_process off: one process accepts, proxies and is the pid measured;
        # -e: the log for messages before the configuration is read
        argv = [self.binary, "-p", str(self.workdir), "-c", str(self.config)]
        argv += ["-e", str(self.workdir / "error.log")]
        argv += ["-g", "daemon off; master_process off;"]
        self.child = Child(self.name, argv, self.workdir / "proxy.log", cpu=self.cpu)
        assert self.ports.portbulk is not None
        self.child.wait_for_port(self.ports.portbulk)
        self._check_udp()


def nginx_stream() -> tuple[str, str] | str:
    """(nginx binary, stream module path or "" when built in) when nginx can proxy
    streams here, else why not (for the notes under the table)."""
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else ""
    )
    if not binary:
        return "nginx not installed: apt-get install nginx libnginx-mod-stream"
    try:
        built = subprocess.run(
            [binary, "-V"], capture_output=True, text=True, timeout=10, check=False
        ).stderr
    except OSError as exc:
        return f"nginx not runnable: {exc}"
    version = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", built)
    if version is None or tuple(map(int, version.groups())) < NGINX_MIN_VERSION:
        found = version.group(0) if version else "nginx of unknown version"
        return f"{found}: nginx >= 1.21.4 needed (proxy_half_close)"
    flags = built.split()
    if "--with-stream" in flags:  # compiled in
        return binary, ""
    for directory in NGINX_MODULE_DIRS:
        module = Path(directory) / "ngx_stream_module.so"
        if module.exists():
            return binary, str(module)
    return "nginx has no stream module: apt-get install libnginx-mod-stream"
