"""``workers = 2`` end to end: a real ``discoproxy serve`` with two worker processes behind
one control plane, clients from many loopback addresses (127.0.0.0/8), so both workers
get some. Limits per client IP hold across workers (steering keeps an IP on one worker),
a killed worker is replaced while the other's connections carry on, a table swap reaches
both, the numbers are summed, the status cache is shared."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import socketserver
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from discoproxy.protocol import minecraft
from discoproxy.protocol.errors import NeedData
from discoproxy.proxy.steering import steer_index
from tests.support import ProxyProcess, running_proxy, serving

WORKERS = 2
# loopback sources, with the worker each is steered to
SOURCES = [f"127.0.0.{n}" for n in range(2, 14)]
ON = {w: [ip for ip in SOURCES if steer_index(ip, WORKERS) == w] for w in range(WORKERS)}
HELLO = minecraft.encode_handshake(765, "mc.example.com", 25565, 2) + minecraft.encode_login_start(
    "tester"
)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Status(socketserver.BaseRequestHandler):
    """A Minecraft server's status answer, counting the pings it gets."""

    pings = 0

    def handle(self) -> None:
        buffer = bytearray()
        while isinstance(hs := minecraft.parse_handshake(buffer), NeedData):
            chunk = self.request.recv(4096)
            if not chunk:
                return
            buffer += chunk
        del buffer[: hs.length]
        while True:
            while isinstance(packet := minecraft.parse_packet(buffer), NeedData):
                chunk = self.request.recv(4096)
                if not chunk:
                    return
                buffer += chunk
            del buffer[: packet.length]
            if packet.packet_id == 0:
                type(self).pings += 1
                document = {
                    "version": {"name": "test", "protocol": hs.protocol_version},
                    "players": {"max": 20, "online": 3, "sample": []},
                    "description": {"text": "shared"},
                }
                self.request.sendall(minecraft.encode_status_response(json.dumps(document)))
            else:
                self.request.sendall(minecraft.encode_pong(packet.payload))
                return


def mc(port: int, extra: str = "") -> dict[str, str]:
    return {"mc.toml": f'domains = ["mc.example.com"]\naddresses = ["127.0.0.1:{port}"]\n{extra}'}


def dial(proxy: ProxyProcess, source: str) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", proxy.port))
    return sock


def echoes(sock: socket.socket, data: bytes = HELLO) -> bool:
    """Whether ``data`` comes back as sent (the backend's echo), not a refusal."""
    sock.sendall(data)
    got = b""
    try:
        while len(got) < len(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except OSError:
        return False
    return got == data


def api(proxy: ProxyProcess, path: str) -> Any:
    with urllib.request.urlopen(proxy.admin_url() + path, timeout=5) as answer:
        return json.load(answer)


def ready(proxy: ProxyProcess) -> bool:
    try:
        with urllib.request.urlopen(proxy.admin_url() + "/readyz", timeout=5) as answer:
            return bool(answer.status == 200)
    except urllib.error.HTTPError:
        return False


def health(proxy: ProxyProcess) -> bool:
    try:
        with urllib.request.urlopen(proxy.admin_url() + "/healthz", timeout=5) as answer:
            return bool(answer.status == 200)
    except urllib.error.HTTPError:
        return False


def wait_until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_both_workers_serve_and_the_numbers_are_summed(tmp_path: Path) -> None:
    assert ON[0] and ON[1], "the sources must reach both workers"
    with serving(_Echo) as port, running_proxy(tmp_path, mc(port), "workers = 2\n") as proxy:
        proxy.wait_for_line("worker 1 ready")
        held = [dial(proxy, ip) for ip in SOURCES]
        assert all(echoes(sock) for sock in held)
        listed = api(proxy, "/api/connections")
        assert listed["total"] == len(SOURCES)
        by_ip = {c["client"].rsplit(":", 1)[0]: c["worker"] for c in listed["connections"]}
        assert by_ip == {ip: steer_index(ip, WORKERS) for ip in SOURCES}
        for sock in held:
            sock.close()
        proxy.wait_for_line(rf"conn #\d+ closed: client={ON[1][0]}:.* worker=1 reason=")
        proxy.wait_for_line(rf"conn #\d+ closed: client={ON[0][0]}:.* worker=0 reason=")
        wait_until(lambda: api(proxy, "/api/routes")["routes"][0]["connections_total"] == 12)
        (route,) = api(proxy, "/api/routes")["routes"]
        assert route["active"] == 0
        assert route["bytes_up"] == route["bytes_down"] == len(SOURCES) * len(HELLO)
        with urllib.request.urlopen(proxy.admin_url() + "/metrics", timeout=5) as answer:
            metrics = answer.read().decode()
        accepted = f'discoproxy_connections_accepted_total{{listener="127.0.0.1:{proxy.port}"}}'
        assert f"{accepted} 12.0" in metrics, metrics
        assert 'discoproxy_worker_up{worker="0"} 1.0' in metrics
        assert 'discoproxy_worker_up{worker="1"} 1.0' in metrics
        assert 'discoproxy_worker_restarts_total{worker="1"} 0.0' in metrics
        assert 'discoproxy_worker_resident_memory_bytes{worker="1"}' in metrics
        workers = api(proxy, "/api/workers")["workers"]
        assert [w["index"] for w in workers] == [0, 1]
        assert all(w["ready"] and w["pid"] for w in workers)
        assert len({w["pid"] for w in workers} | {proxy.process.pid}) == 3


def test_max_connections_per_ip_holds_across_workers(tmp_path: Path) -> None:
    config = "workers = 2\nmax_connections_per_ip = 2\n"
    with serving(_Echo) as port, running_proxy(tmp_path, mc(port), config) as proxy:
        proxy.wait_for_line("worker 1 ready")
        sources = [ON[0][0], ON[0][1], ON[1][0], ON[1][1]]
        held = []
        for ip in sources:
            first, second, third = (dial(proxy, ip) for _ in range(3))
            assert echoes(first) and echoes(second), ip
            assert not echoes(third), f"{ip}: a third connection got through"
            third.close()
            held += [first, second]
        listed = api(proxy, "/api/connections")["connections"]
        assert {c["worker"] for c in listed} == {0, 1}
        assert len(listed) == 2 * len(sources)
        for sock in held:
            sock.close()


def test_max_players_holds_across_workers_and_a_dead_workers_players_leave(
    tmp_path: Path,
) -> None:
    """max_players = 1 with the one login held on worker 1: a login steered to worker 0
    is refused (the counts are shared); once that player leaves, and again once worker 1
    dies with a player, a login through worker 0 gets in."""
    with (
        serving(_Echo) as port,
        running_proxy(tmp_path, mc(port, "max_players = 1\n"), "workers = 2\n") as proxy,
    ):
        proxy.wait_for_line("worker 1 ready")
        held = dial(proxy, ON[1][0])
        assert echoes(held)
        with dial(proxy, ON[0][0]) as second:
            assert not echoes(second), "a second player got in through the other worker"
        proxy.wait_for_line(r"refused: full \(1 players\)")
        held.close()

        def gets_in(ip: str) -> bool:
            with dial(proxy, ip) as sock:
                return echoes(sock)

        wait_until(lambda: gets_in(ON[0][0]))
        held = dial(proxy, ON[1][0])
        deadline = time.monotonic() + 10
        while not echoes(held):  # until worker 0 has counted its player out
            assert time.monotonic() < deadline, "worker 0 kept its player counted"
            held.close()
            time.sleep(0.05)
            held = dial(proxy, ON[1][0])
        pids = {w["index"]: w["pid"] for w in api(proxy, "/api/workers")["workers"]}
        os.kill(pids[1], signal.SIGKILL)
        proxy.wait_for_line(r"worker 1 \(pid \d+\) exited with signal SIGKILL")
        wait_until(lambda: gets_in(ON[0][0]))  # its player's count went with it
        held.close()


def test_the_rate_budget_holds_across_workers(tmp_path: Path) -> None:
    config = "workers = 2\n[rate_limit]\nconnections = 3\nwindow = 60\n"
    with serving(_Echo) as port, running_proxy(tmp_path, mc(port), config) as proxy:
        proxy.wait_for_line("worker 1 ready")
        for ip in (ON[0][0], ON[1][0]):
            results = []
            for _ in range(5):
                with dial(proxy, ip) as sock:
                    results.append(echoes(sock))
            assert results == [True, True, True, False, False], ip


def test_a_killed_worker_is_replaced_and_the_other_keeps_its_connections(tmp_path: Path) -> None:
    with serving(_Echo) as port, running_proxy(tmp_path, mc(port), "workers = 2\n") as proxy:
        proxy.wait_for_line("worker 1 ready")
        survivor = dial(proxy, ON[0][0])
        doomed = dial(proxy, ON[1][0])
        assert echoes(survivor) and echoes(doomed)
        pids = {w["index"]: w["pid"] for w in api(proxy, "/api/workers")["workers"]}
        os.kill(pids[1], signal.SIGKILL)
        seen = set()  # /readyz and /healthz while it is replaced (a back-off, then a start)
        while proxy.output().count("worker 1 ready") < 2:
            seen.add((ready(proxy), health(proxy)))
            time.sleep(0.02)
        assert (False, True) in seen, seen  # not ready, yet healthy: no reason to restart all
        proxy.wait_for_line(r"worker 1 \(pid \d+\) exited with signal SIGKILL; starting it again")
        assert doomed.recv(100) == b""  # its connections ended with it
        doomed.close()
        assert echoes(survivor, b"still here")  # the other worker's did not
        wait_until(lambda: ready(proxy))
        workers = api(proxy, "/api/workers")["workers"]
        assert workers[1]["restarts"] == 1 and workers[1]["pid"] != pids[1]
        assert workers[0]["pid"] == pids[0]
        with dial(proxy, ON[1][0]) as again:  # the same client reaches the new worker
            assert echoes(again)
        assert echoes(survivor, b"and still")
        survivor.close()


def test_a_stuck_worker_is_killed_and_replaced_and_its_clients_are_served_again(
    tmp_path: Path,
) -> None:
    """A worker that hangs (SIGSTOP here: its loop and reactor answer nothing) still
    holds its socket of each group, and the kernel keeps steering its clients' IPs to
    it: without the watchdog they waited on it for good."""
    config = "workers = 2\nstall_timeout = 2\n"
    with serving(_Echo) as port, running_proxy(tmp_path, mc(port), config) as proxy:
        proxy.wait_for_line("worker 1 ready")
        survivor = dial(proxy, ON[0][0])
        assert echoes(survivor)
        pids = {w["index"]: w["pid"] for w in api(proxy, "/api/workers")["workers"]}
        time.sleep(3)  # a healthy worker answers every check: not killed
        assert "stalled" not in proxy.output(), proxy.output()
        os.kill(pids[1], signal.SIGSTOP)
        proxy.wait_for_line(
            rf"worker 1 \(pid {pids[1]}\) stalled: no answer in 2s; killing it", timeout=10
        )
        proxy.wait_for_line(r"worker 1 \(pid \d+\) exited with signal SIGKILL", timeout=10)
        wait_until(lambda: ready(proxy))
        with dial(proxy, ON[1][0]) as again:  # its client reaches the new worker
            assert echoes(again)
        assert echoes(survivor, b"still here")  # the other worker's did not notice
        survivor.close()
        workers = api(proxy, "/api/workers")["workers"]
        assert workers[1]["restarts"] == 1 and workers[0]["pid"] == pids[0]


def counters(proxy: ProxyProcess) -> dict[str, float]:
    """Every counter sample of the data planes on /metrics (histograms' buckets, counts
    and sums too; not the per-process worker_* ones, which are each process's own)."""
    with urllib.request.urlopen(proxy.admin_url() + "/metrics", timeout=5) as answer:
        text = answer.read().decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if not name.startswith("discoproxy_") or name.startswith("discoproxy_worker_"):
            continue
        if name.split("{", 1)[0].endswith(("_total", "_count", "_sum", "_bucket")):
            out[name] = float(value)
    return out


def went_down(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    return {k: (v, after.get(k)) for k, v in before.items() if v and after.get(k, 0.0) < v}


def test_counters_never_go_down_when_a_worker_is_killed_and_replaced(tmp_path: Path) -> None:
    """A dead worker's last numbers stay in the sums (its open connection counted as
    ended), while it is away and after its replacement starts from zero; the gauges
    (open connections) drop it. The dashboard's history is as monotonic."""
    with serving(_Echo) as port, running_proxy(tmp_path, mc(port), "workers = 2\n") as proxy:
        proxy.wait_for_line("worker 1 ready")
        for ip in SOURCES:
            with dial(proxy, ip) as sock:
                assert echoes(sock)
        wait_until(lambda: api(proxy, "/api/routes")["routes"][0]["connections_total"] == 12)
        doomed = dial(proxy, ON[1][0])  # open on worker 1 when it dies: bytes counted
        assert echoes(doomed)
        wait_until(lambda: api(proxy, "/api/routes")["routes"][0]["active"] == 1)
        # the history has a sample with everything in it before the kill
        wait_until(
            lambda: any(s["connections_total"] == 13 for s in api(proxy, "/api/history")["samples"])
        )
        before = counters(proxy)
        accepted = f'discoproxy_connections_accepted_total{{listener="127.0.0.1:{proxy.port}"}}'
        assert before[accepted] == 13
        pids = {w["index"]: w["pid"] for w in api(proxy, "/api/workers")["workers"]}
        os.kill(pids[1], signal.SIGKILL)
        proxy.wait_for_line(r"worker 1 \(pid \d+\) exited with signal SIGKILL")
        away = counters(proxy)  # worker 1 not running: its last numbers
        assert went_down(before, away) == {}
        assert api(proxy, "/api/routes")["routes"][0]["active"] == 0  # a gauge: not kept
        wait_until(lambda: proxy.output().count("worker 1 ready") == 2 and ready(proxy))
        restarted = time.time()
        replaced = counters(proxy)
        assert went_down(before, replaced) == {}
        assert replaced[accepted] == 13
        with dial(proxy, ON[1][1]) as sock:  # the new worker 1 counts on top
            assert echoes(sock)
        wait_until(lambda: counters(proxy)[accepted] == 14)
        assert went_down(replaced, counters(proxy)) == {}
        wait_until(lambda: api(proxy, "/api/history")["samples"][-1]["t"] > restarted + 2)
        samples = api(proxy, "/api/history")["samples"]
        for key in ("connections_total", "bytes_up", "bytes_down"):
            series = [s[key] for s in samples]
            assert series == sorted(series), (key, series)
        doomed.close()


class _Web(socketserver.BaseRequestHandler):
    """An HTTP backend that answers every request with its name; its health path says
    200 when ``healthy``, 500 otherwise (its requests are served either way: only the
    active check tells it apart)."""

    healthy: dict[int, bool] = {}

    def handle(self) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            head += chunk
        port = int(self.request.getsockname()[1])  # the port this backend listens on
        if head.startswith(b"GET /health "):
            status = "200 OK" if self.healthy[port] else "500 Internal Server Error"
            body = b"health"
        else:
            status, body = "200 OK", f"backend {port}".encode()
        reply = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        self.request.sendall(reply.encode() + body)


def served_by(proxy: ProxyProcess, source: str) -> str:
    """The backend that answered an HTTP request from ``source`` through the proxy."""
    with dial(proxy, source) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: web.example.com\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.rsplit(b"\r\n\r\n", 1)[-1].decode()


def test_a_replaced_worker_gets_the_health_checks_verdicts_it_missed(tmp_path: Path) -> None:
    """The checker tells the pools of a change only; a worker started again hears the
    verdicts in force with its table, so it never dials a backend the checks hold down."""
    with serving(_Web) as good, serving(_Web) as bad:
        _Web.healthy = {good: True, bad: False}
        check = '{ type = "http", http_path = "/health", interval = 0.2, rise = 1, fall = 1 }'
        servers = {
            "web.toml": 'domains = ["web.example.com"]\nbalance = "round_robin"\n'
            f'addresses = ["127.0.0.1:{good}", "127.0.0.1:{bad}"]\nhealth_check = {check}\n'
        }
        with running_proxy(tmp_path, servers, "workers = 2\n") as proxy:
            proxy.wait_for_line("worker 1 ready")
            proxy.wait_for_line(rf"backend 127.0.0.1:{bad} of web@file down")
            time.sleep(0.5)  # more failed checks, which change nothing: not sent again
            assert {served_by(proxy, ip) for ip in ON[1][:4]} == {f"backend {good}"}
            pids = {w["index"]: w["pid"] for w in api(proxy, "/api/workers")["workers"]}
            os.kill(pids[1], signal.SIGKILL)
            wait_until(lambda: proxy.output().count("worker 1 ready") == 2 and ready(proxy))
            answers = [served_by(proxy, ip) for ip in ON[1] for _ in range(2)]
            assert set(answers) == {f"backend {good}"}, answers
            # the others' logs and webhooks heard the transition once: not again
            assert proxy.output().count(f"backend 127.0.0.1:{bad} of web@file down") == 1


def test_a_table_swap_reaches_every_worker(tmp_path: Path) -> None:
    with serving(_Echo) as port, running_proxy(tmp_path, mc(port), "workers = 2\n") as proxy:
        proxy.wait_for_line("worker 1 ready")
        for ip in (ON[0][0], ON[1][0]):
            with dial(proxy, ip) as sock:
                assert echoes(sock)
        (tmp_path / "servers" / "mc.toml").unlink()
        wait_until(lambda: not api(proxy, "/api/routes")["routes"])
        time.sleep(0.2)  # the workers' copies follow the control plane's, in order
        for ip in (ON[0][0], ON[1][0]):
            with dial(proxy, ip) as sock:
                assert not echoes(sock), f"{ip}: routed to a removed server"


def test_status_pings_from_both_workers_cost_one_backend_ping(tmp_path: Path) -> None:
    _Status.pings = 0
    with serving(_Status) as port, running_proxy(tmp_path, mc(port), "workers = 2\n") as proxy:
        proxy.wait_for_line("worker 1 ready")
        for ip in [*ON[0][:2], *ON[1][:2]]:
            with dial(proxy, ip) as sock:
                hello = minecraft.encode_handshake(765, "mc.example.com", 25565, 1)
                ping = minecraft.encode_packet(0x01, b"12345678")
                sock.sendall(hello + minecraft.encode_packet(0x00, b"") + ping)
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
                assert b"shared" in reply, reply
        assert _Status.pings == 1


def test_sighup_reaches_every_worker(tmp_path: Path) -> None:
    with serving(_Echo) as port, running_proxy(tmp_path, mc(port), "workers = 2\n") as proxy:
        proxy.wait_for_line("worker 1 ready")
        config = tmp_path / "discoproxy.toml"
        config.write_text(config.read_text() + 'max_connections_per_ip = 1\nlog_level = "error"\n')
        proxy.process.send_signal(signal.SIGHUP)  # "config reloaded" is below the new level

        def limited(ip: str) -> bool:
            first, second = dial(proxy, ip), dial(proxy, ip)
            try:
                return echoes(first) and not echoes(second)
            finally:
                first.close()
                second.close()

        for ip in (ON[0][0], ON[1][0]):
            wait_until(lambda ip=ip: limited(ip))
        time.sleep(0.3)
        # the workers log at the new level too: their refusals (warnings) are not written
        assert "rejected" not in proxy.output(), proxy.output()


def test_webhooks_added_by_a_reload_hear_every_worker_s_players(tmp_path: Path) -> None:
    """Each worker keeps only the events some receiver asks for (its outbox's wanted
    set, from its start): a reload that adds a webhook must reach them too."""
    import http.server
    import json
    import threading

    heard: list[str] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            heard.append(f"{body['event']} {body['client'].rpartition(':')[0]}")
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    try:
        with serving(_Echo) as port, running_proxy(tmp_path, mc(port), "workers = 2\n") as proxy:
            proxy.wait_for_line("worker 1 ready")
            config = tmp_path / "discoproxy.toml"
            url = f"http://127.0.0.1:{hooks.server_address[1]}/hook"
            hook = f'\n[[webhooks]]\nurl = "{url}"\nevents = ["player_connected"]\n'
            config.write_text(config.read_text() + hook)
            proxy.process.send_signal(signal.SIGHUP)
            proxy.wait_for_line(r"webhooks: 1 receivers \(1 added, 0 removed\)")
            for ip in (ON[0][0], ON[1][0]):
                with dial(proxy, ip) as sock:
                    assert echoes(sock)
            expected = sorted(f"player_connected {ON[w][0]}" for w in (0, 1))
            wait_until(lambda: sorted(heard) == expected)
    finally:
        hooks.shutdown()
        hooks.server_close()


def test_sigterm_drains_every_worker(tmp_path: Path) -> None:
    with serving(_Echo) as port, running_proxy(tmp_path, mc(port), "workers = 2\n") as proxy:
        proxy.wait_for_line("worker 1 ready")
        held = [dial(proxy, ON[0][0]), dial(proxy, ON[1][0])]
        assert all(echoes(sock) for sock in held)
        proxy.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        drained = [echoes(sock, b"draining") for sock in held]
        assert drained == [True, True], proxy.output()
        for sock in held:
            sock.close()
        assert proxy.process.wait(15) == 0
        proxy.wait_for_line("stopped$")
        assert "starting it again" not in proxy.output()  # a drain is not a crash


def _refused(proxy: ProxyProcess, source: str) -> bool:
    """Whether a new connection from ``source`` is refused (not taken into a backlog
    nobody accepts from any more)."""
    try:
        sock = dial(proxy, source)
    except ConnectionRefusedError:
        return True
    sock.close()
    return False


def test_sigterm_refuses_new_connections_at_once_while_open_ones_drain(tmp_path: Path) -> None:
    """As one process does: the drain closes every listening socket, the control plane's
    copies too, so a new client is refused instead of waiting in a backlog for up to
    shutdown_timeout; the open connections carry on meanwhile."""
    with serving(_Echo) as port, running_proxy(tmp_path, mc(port), "workers = 2\n") as proxy:
        proxy.wait_for_line("worker 1 ready")
        held = [dial(proxy, ON[0][0]), dial(proxy, ON[1][0])]
        assert all(echoes(sock) for sock in held)
        proxy.process.send_signal(signal.SIGTERM)
        proxy.wait_for_line("SIGTERM received")
        wait_until(lambda: all(_refused(proxy, ip) for ip in (ON[0][1], ON[1][1])), timeout=1.5)
        assert [echoes(sock, b"draining") for sock in held] == [True, True], proxy.output()
        assert proxy.process.poll() is None  # still draining them
        for sock in held:
            sock.close()
        assert proxy.process.wait(15) == 0


class _UdpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)


def test_udp_sessions_stay_on_the_worker_their_client_ip_is_steered_to(tmp_path: Path) -> None:
    server = socketserver.ThreadingUDPServer(("127.0.0.1", 0), _UdpEcho)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        listen = probe.getsockname()[1]
    backend = server.server_address[1]
    servers = {"udp.toml": f'addresses = ["127.0.0.1"]\nports = ["{listen}:{backend}/udp"]\n'}
    config = 'workers = 2\nport_routes_bind = "127.0.0.1"\n'
    try:
        with running_proxy(tmp_path, servers, config) as proxy:
            proxy.wait_for_line("worker 1 ready")
            clients = []
            for ip in [ON[0][0], ON[1][0], ON[0][1], ON[1][1]]:
                client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                client.settimeout(0.2)
                client.bind((ip, 0))
                clients.append(client)
                deadline = time.monotonic() + 10
                while True:  # the port route opens a moment after the start
                    client.sendto(b"hello", ("127.0.0.1", listen))
                    try:
                        if client.recv(64) == b"hello":
                            break
                    except OSError:
                        pass
                    assert time.monotonic() < deadline, proxy.output()
                for n in range(5):  # the same session, the same worker, every datagram
                    payload = b"again %d" % n
                    client.sendto(payload, ("127.0.0.1", listen))
                    while (got := client.recv(64)) != payload:
                        assert got == b"hello", got  # a late answer to a retried probe
            sessions = [
                c for c in api(proxy, "/api/connections")["connections"] if c["protocol"] == "udp"
            ]
            by_client = {c["client"]: c["worker"] for c in sessions}
            expected = {
                "{}:{}".format(*c.getsockname()): steer_index(c.getsockname()[0], WORKERS)
                for c in clients
            }
            assert by_client == expected
            for client in clients:
                client.close()
        # each session's close line (at the drain) says which worker it was on
        for client_address, worker in expected.items():
            line = rf"udp session #\d+ closed: client={client_address} .* worker={worker} reason="
            proxy.wait_for_line(line)
    finally:
        server.shutdown()
        server.server_close()


def test_workers_exit_when_their_control_plane_is_killed(tmp_path: Path) -> None:
    """No orphan keeps the ports: a worker whose channel closes drains and exits."""
    with serving(_Echo) as port, running_proxy(tmp_path, mc(port), "workers = 2\n") as proxy:
        proxy.wait_for_line("worker 1 ready")
        pids = [w["pid"] for w in api(proxy, "/api/workers")["workers"]]
        os.kill(proxy.process.pid, signal.SIGKILL)
        proxy.process.wait(5)

        def gone(pid: int) -> bool:
            try:
                return "zombie" in Path(f"/proc/{pid}/status").read_text()
            except OSError:
                return True

        wait_until(lambda: all(gone(pid) for pid in pids))


# Loaded into every process of the proxy under test (PYTHONPATH): in a worker it records
# each path handed to ssl to load and each stat() of a file under the test's directory.
_RECORDER = """
import os, ssl, sys
if "discoproxy.proxy.worker" in sys.orig_argv:
    _log = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    _watched = {watched!r}

    def _record(what, path):
        os.write(_log, f"{{os.getpid()}} {{what}} {{path}}\\n".encode())

    def _wrap(name):
        original = getattr(ssl.SSLContext, name)

        def wrapper(self, *args, **kwargs):
            for path in [*args, *kwargs.values()]:
                if isinstance(path, (str, os.PathLike)):
                    _record(name, os.fspath(path))
            return original(self, *args, **kwargs)

        setattr(ssl.SSLContext, name, wrapper)

    _wrap("load_cert_chain")
    _wrap("load_verify_locations")
    _stat = os.stat

    def stat(path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(_watched):
            _record("stat", os.fspath(path))
        return _stat(path, *args, **kwargs)

    os.stat = stat
"""


def _served_serial(proxy: ProxyProcess, source: str) -> int:
    """The serial of the certificate the proxy shows a TLS client from ``source``."""
    from tests.proxy.test_tls_termination import _decode, client_context

    with (
        dial(proxy, source) as raw,
        client_context().wrap_socket(raw, server_hostname="tls.example.com") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(b"ping")
        assert tls.recv(64) == b"ping"
    serial = _decode(der)["serial"]
    assert isinstance(serial, int)
    return serial


def test_workers_terminate_tls_with_certificates_the_control_plane_reads(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A worker reads no file: the control plane reads a route's certificate and key
    (and each change of them) and sends the bytes; the worker loads them from memory."""
    from tests.proxy.test_tls_termination import make_cert

    certs = tmp_path / "certs"
    certs.mkdir()
    cert, key = make_cert(certs, "tls.example.com", serial=1)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    log = tmp_path / "worker-loads.log"
    (hooks / "sitecustomize.py").write_text(_RECORDER.format(log=str(log), watched=str(certs)))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])
    )
    tls = f'tls = {{ cert = "{cert}", key = "{key}" }}\n'
    with serving(_Echo) as port:
        servers = {
            "tls.toml": f'domains = ["tls.example.com"]\naddresses = ["127.0.0.1:{port}"]\n{tls}'
        }
        with running_proxy(tmp_path, servers, "workers = 2\n") as proxy:
            sources = [ON[0][0], ON[1][0]]  # one client on each worker
            assert [_served_serial(proxy, s) for s in sources] == [1, 1]
            make_cert(certs, "tls.example.com", serial=2)  # rotated in place

            def rotated() -> bool:
                return [_served_serial(proxy, s) for s in sources] == [2, 2]

            wait_until(rotated, timeout=15)
            workers = {w["pid"] for w in api(proxy, "/api/workers")["workers"]}
    records = [line.split(" ", 2) for line in log.read_text().splitlines()]
    assert {int(pid) for pid, _, _ in records} == workers  # both workers loaded them
    assert [r for r in records if r[1] == "stat"] == []
    loaded = [path for _, what, path in records if what == "load_cert_chain"]
    assert len(loaded) >= 8  # cert and key, twice (serial 1 and 2) in each worker
    assert all(path.startswith("/proc/self/fd/") for path in loaded), loaded


def test_per_ip_limits_hold_for_clients_behind_proxy_protocol_balancers(tmp_path: Path) -> None:
    """The kernel steers by the balancer's address; the PROXY header names the client. A
    connection whose client another worker owns is handed to that worker, so two
    balancers on two workers sending one client still meet max_connections_per_ip, and
    one balancer's clients are spread over the workers by their own addresses."""
    config = (
        "workers = 2\nmax_connections_per_ip = 1\nreceive_proxy_protocol = true\n"
        'trusted_proxies = ["127.0.0.0/8"]\n'
    )

    def through(balancer: str, client: str) -> socket.socket:
        sock = dial(proxy, balancer)
        sock.sendall(f"PROXY TCP4 {client} 127.0.0.1 40000 25565\r\n".encode())
        return sock

    with serving(_Echo) as port, running_proxy(tmp_path, mc(port), config) as proxy:
        proxy.wait_for_line("worker 1 ready")
        first = through(ON[0][0], "203.0.113.5")
        assert echoes(first)
        with through(ON[1][0], "203.0.113.5") as second:  # the other balancer, same client
            assert not echoes(second), "the client got a second connection on another worker"
        clients = [f"198.51.100.{n}" for n in range(1, 9)]
        held = [through(ON[0][0], client) for client in clients]  # one balancer
        assert all(echoes(sock) for sock in held)
        listed = api(proxy, "/api/connections")["connections"]
        by_client = {c["client"].rsplit(":", 1)[0]: c["worker"] for c in listed}
        for client in [*clients, "203.0.113.5"]:
            assert by_client[client] == steer_index(client, WORKERS), client
        assert set(by_client.values()) == {0, 1}  # spread, though one balancer sent them
        for sock in [first, *held]:
            sock.close()


def test_a_port_route_connection_is_handed_to_its_clients_worker(tmp_path: Path) -> None:
    """A TCP port route behind a PROXY-protocol balancer: the connection goes on from
    the worker that owns the header's client, forwarding what came after the header."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        listen = probe.getsockname()[1]
    config = (
        'workers = 2\nport_routes_bind = "127.0.0.1"\nreceive_proxy_protocol = true\n'
        'trusted_proxies = ["127.0.0.0/8"]\n'
    )
    client = next(f"198.51.100.{n}" for n in range(1, 50) if steer_index(f"198.51.100.{n}", 2))
    with serving(_Echo) as port:
        servers = {"rcon.toml": f'addresses = ["127.0.0.1"]\nports = ["{listen}:{port}/tcp"]\n'}
        with running_proxy(tmp_path, servers, config) as proxy:
            proxy.wait_for_line("worker 1 ready")
            wait_until(lambda: _port_open(listen))
            with socket.create_connection(("127.0.0.1", listen), timeout=5) as sock:
                sock.sendall(f"PROXY TCP4 {client} 127.0.0.1 40000 {listen}\r\nhello".encode())
                assert sock.recv(5) == b"hello"
                listed = api(proxy, "/api/connections")["connections"]
                (conn,) = [c for c in listed if c["client"].startswith(client + ":")]
                assert conn["worker"] == 1  # steered by 127.0.0.1 (worker 0) first
    assert steer_index("127.0.0.1", 2) == 0


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_second_proxy_with_workers_is_refused_the_port_not_let_share_it(
    tmp_path: Path,
) -> None:
    """Workers bind with SO_REUSEPORT, which alone would let a second discoproxy (with
    workers too) join the first one's group and silently take a share of its clients;
    it gets the start failure a port in use gives instead."""
    import subprocess
    import sys

    from discoproxy.cli import EXIT_START

    with serving(_Echo) as port, running_proxy(tmp_path / "a", mc(port), "workers = 2\n") as first:
        first.wait_for_line("worker 1 ready")
        second = tmp_path / "b"
        second.mkdir()
        (second / "discoproxy.toml").write_text(
            f'workers = 2\nbind = ["127.0.0.1:{first.port}"]\nservers_dir = "{second}"\n'
            '[admin]\nlisten = ""\n[providers.docker]\nenabled = false\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOPROXY_")}
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "discoproxy",
                "serve",
                "--config",
                str(second / "discoproxy.toml"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, "NO_COLOR": "1"},
        )
        assert result.returncode == EXIT_START, result.stderr
        assert f"cannot listen on 127.0.0.1:{first.port}: address already in use" in result.stderr
        with dial(first, ON[1][0]) as sock:  # the first serves on, alone
            assert echoes(sock)


def test_an_exclusive_udp_group_is_refused_a_port_another_group_holds() -> None:
    """The probe clears SO_REUSEADDR for UDP, which alone would let it bind beside a
    group that set it (a port route's sockets do); a port route's own group is not
    exclusive: one that comes back joins the sockets its workers still serve on."""
    from discoproxy.proxy.workers import open_group

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as port_socket does
        return sock

    held = open_group(make, ("127.0.0.1", 0), 2, listen=False)
    try:
        with pytest.raises(OSError) as taken:
            address = ("127.0.0.1", held[0].getsockname()[1])
            open_group(make, address, 2, listen=False, exclusive=True)
        assert taken.value.errno == errno.EADDRINUSE
    finally:
        for sock in held:
            sock.close()
