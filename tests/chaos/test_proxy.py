"""The fault proxy and the throwaway cluster themselves: each fault does what the chaos tests rely on."""

from __future__ import annotations

import random
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from harness.pgcluster import PgCluster
from harness.proxy import FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _EchoServer = self.server  # type: ignore[assignment]
        try:
            while data := self.request.recv(65536):
                with server.lock:
                    server.received += data
                self.request.sendall(data)
        except ConnectionError:
            pass  # the proxy reset it: that is what these tests do


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.received = b""
        self.lock = threading.Lock()


@pytest.fixture
def echo() -> Iterator[_EchoServer]:
    server = _EchoServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def proxy(echo: _EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.server_address[1]) as p:
        yield p


def _connect(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_forwards_both_ways(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        payload = bytes(range(256)) * 1000
        sock.sendall(payload)
        assert _recv_exactly(sock, len(payload)) == payload


def test_url_for_keeps_user_database_and_query(proxy: FaultProxy) -> None:
    url = proxy.url_for("postgresql://alice:pw@db.example:6432/app?sslmode=disable")
    assert url == f"postgresql://alice:pw@127.0.0.1:{proxy.port}/app?sslmode=disable"
    assert proxy.url_for("postgresql://db/x") == f"postgresql://127.0.0.1:{proxy.port}/x"


def test_blackhole_holds_bytes_and_new_connections_until_heal(proxy: FaultProxy, echo: _EchoServer) -> None:
    with _connect(proxy) as live:
        live.sendall(b"before")
        assert _recv_exactly(live, 6) == b"before"
        proxy.blackhole(True)
        live.sendall(b"during")
        live.settimeout(0.4)
        with pytest.raises(TimeoutError):
            live.recv(10)  # nothing comes back, and the connection is not closed either
        fresh = _connect(proxy)  # accepted by the kernel, then silent
        fresh.sendall(b"new")
        fresh.settimeout(0.3)
        with pytest.raises(TimeoutError):
            fresh.recv(10)
        assert b"during" not in echo.received and b"new" not in echo.received
        proxy.blackhole(False)
        live.settimeout(5)
        fresh.settimeout(5)
        assert _recv_exactly(live, 6) == b"during"  # held, not dropped: TCP retransmits through a partition
        assert _recv_exactly(fresh, 3) == b"new"
        fresh.close()


def test_reset_all_aborts_live_connections_with_rst(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        sock.sendall(b"x")
        assert _recv_exactly(sock, 1) == b"x"
        assert proxy.reset_all() == 1
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    with _connect(proxy) as again:  # the proxy itself keeps serving
        again.sendall(b"z")
        assert _recv_exactly(again, 1) == b"z"


def test_delay_adds_latency(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        proxy.set_delay(0.2)
        started = time.monotonic()
        sock.sendall(b"ping")
        assert _recv_exactly(sock, 4) == b"ping"
        assert time.monotonic() - started >= 0.4  # once each way
        proxy.set_delay(0)


def test_reset_after_forwards_then_withholds_the_reply(proxy: FaultProxy, echo: _EchoServer) -> None:
    proxy.reset_after(b"COMMIT", 1.0, random.Random(1))
    with _connect(proxy) as sock:
        sock.sendall(b"SELECT 1")
        assert _recv_exactly(sock, 8) == b"SELECT 1"  # no match: untouched
        sock.sendall(b"xxCOMMITyy")
        with pytest.raises(ConnectionResetError):
            sock.recv(100)
    assert b"xxCOMMITyy" in echo.received  # the server got it: an indeterminate outcome for the client
    assert proxy.resets_injected == 1
    proxy.reset_after(b"COMMIT", 0.0)
    with _connect(proxy) as sock:
        sock.sendall(b"COMMIT")
        assert _recv_exactly(sock, 6) == b"COMMIT"


def test_reset_after_matches_across_chunks(proxy: FaultProxy) -> None:
    proxy.reset_after(b"COMMIT", 1.0, random.Random(1))
    with _connect(proxy) as sock:
        sock.sendall(b"xxCOM")
        assert _recv_exactly(sock, 5) == b"xxCOM"
        sock.sendall(b"MITyy")
        with pytest.raises(ConnectionResetError):
            sock.recv(100)


# -- against PostgreSQL ----------------------------------------------------------------------------------------


@pytest.fixture
def pg_proxy(pg_url: str) -> Iterator[tuple[FaultProxy, str]]:
    from urllib.parse import urlsplit

    parts = urlsplit(pg_url)
    with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as p:
        yield p, p.url_for(pg_url)


@pytest.mark.postgres
def test_pg_statement_during_partition_runs_after_heal(pg_proxy: tuple[FaultProxy, str]) -> None:
    proxy, url = pg_proxy
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        proxy.blackhole(True)
        result: list[object] = []
        thread = threading.Thread(target=lambda: result.append(conn.execute("SELECT 2").fetchone()))
        thread.start()
        thread.join(0.5)
        assert thread.is_alive() and not result  # blocked, not failed
        proxy.blackhole(False)
        thread.join(5)
        assert result == [(2,)]


@pytest.mark.postgres
def test_pg_reset_all_fails_the_next_statement(pg_proxy: tuple[FaultProxy, str]) -> None:
    proxy, url = pg_proxy
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SELECT 1")
        assert proxy.reset_all() >= 1
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.postgres
def test_pg_reset_after_insert_commits_but_the_client_sees_an_error(pg_proxy: tuple[FaultProxy, str]) -> None:
    proxy, url = pg_proxy
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS proxy_probe (v text)")
        conn.execute("TRUNCATE proxy_probe")
    proxy.reset_after(b"INSERT INTO proxy_probe", 1.0, random.Random(0))
    with (
        psycopg.connect(url, autocommit=True, connect_timeout=5) as conn,
        pytest.raises(psycopg.OperationalError),
    ):
        conn.execute("INSERT INTO proxy_probe VALUES ('indeterminate')")
    proxy.reset_after(None, 0)
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute("SELECT v FROM proxy_probe").fetchall()
        conn.execute("DROP TABLE proxy_probe")
    assert rows == [("indeterminate",)]  # it committed; only the reply was lost
    assert proxy.resets_injected == 1


@pytest.mark.postgres
def test_pg_cluster_survives_an_immediate_stop(pg_cluster: PgCluster) -> None:
    url = pg_cluster.create_database(f"cluster_probe_{random.randrange(1 << 30)}")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (v int)")
        conn.execute("INSERT INTO t VALUES (1)")
    with psycopg.connect(url, autocommit=True) as conn:
        pg_cluster.stop("immediate")
        assert not pg_cluster.running
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    pg_cluster.start()
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT v FROM t").fetchall() == [(1,)]
