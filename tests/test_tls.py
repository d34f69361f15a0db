"""`--ssl`: each service serves HTTPS with the given certificate and key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.procs import free_port


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    return d / "cert.pem", d / "key.pem"


def test_controller_and_api_over_https(services, cert: tuple[Path, Path]) -> None:
    certfile, keyfile = cert
    cport, aport = free_port(), free_port()
    env = {"LLMSTACK_SSL_CERTFILE": str(certfile), "LLMSTACK_SSL_KEYFILE": str(keyfile)}
    controller = services.start("controller", "controller", "--port", cport, "--ssl", env=env)
    api = services.start(
        "api", "api", "--port", aport, "--ssl", "--ssl-certfile", certfile, "--ssl-keyfile", keyfile,
        "--controller-address", f"https://127.0.0.1:{cport}",
    )  # fmt: skip
    deadline_client = httpx.Client(verify=str(certfile), timeout=5)
    for svc, port in ((controller, cport), (api, aport)):
        for _ in range(300):
            try:
                if deadline_client.get(f"https://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert svc.alive(), svc.log_tail()
            import time

            time.sleep(0.1)
        else:
            raise AssertionError(svc.log_tail())
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{cport}/health", timeout=3)  # plain HTTP is not served


def test_ssl_without_files_fails_clearly(services) -> None:
    svc = services.start("controller", "controller", "--port", free_port(), "--ssl", env={"SSL_CERTFILE": ""})
    assert svc.wait(30) == 2
    assert "--ssl needs a certificate and a key" in svc.log_text()
