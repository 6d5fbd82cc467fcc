"""HTTPS (--ssl-keyfile, --ssl-certfile) with a self-signed certificate made by openssl: completions over TLS, a
plain-HTTP client turned away, and the flags' faults named at start."""

import shutil
import subprocess

import httpx
import pytest

from server.config import ConfigError, parse_args

from server_helpers import SERVER_FLAGS, LiveServer


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def test_completions_are_served_over_https(model_dirs, certificate):
    key, cert = certificate
    flags = ["--model", str(model_dirs["mamba1"]), *SERVER_FLAGS, "--ssl-keyfile", str(key), "--ssl-certfile",
             str(cert)]
    with LiveServer(flags) as server:
        assert server.url.startswith("https://")
        with httpx.Client(base_url=server.url, verify=str(cert), timeout=60) as client:
            assert client.get("/health").json() == {"status": "ok"}
            # (ignore_eos: a sampled end of text would end it before 4 tokens)
            body = client.post("/v1/completions", json={"prompt": "the river", "max_tokens": 4,
                                                        "ignore_eos": True}).json()
            assert body["usage"]["completion_tokens"] == 4
        with pytest.raises(httpx.HTTPError):  # plain HTTP gets no answer from a TLS port
            httpx.get(server.url.replace("https://", "http://") + "/health", timeout=10)


def test_tls_flags_are_checked_at_start(model_dirs, certificate, tmp_path):
    key, cert = certificate
    model = ["--model", str(model_dirs["mamba1"])]
    with pytest.raises(ConfigError, match="both --ssl-keyfile and --ssl-certfile"):
        parse_args([*model, "--ssl-keyfile", str(key)])
    with pytest.raises(ConfigError, match="--ssl-certfile .*missing.pem: no such file"):
        parse_args([*model, "--ssl-keyfile", str(key), "--ssl-certfile", str(tmp_path / "missing.pem")])
    (tmp_path / "garbage.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="garbage.pem .*not a PEM certificate and its private key"):
        parse_args([*model, "--ssl-keyfile", str(key), "--ssl-certfile", str(tmp_path / "garbage.pem")])
    with pytest.raises(ConfigError, match="not a PEM certificate"):  # a key that is not the certificate's
        parse_args([*model, "--ssl-keyfile", str(cert), "--ssl-certfile", str(cert)])
