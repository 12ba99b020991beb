"""Throw-away TLS certificates for tests and benchmarks (openssl on PATH)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A throw-away certificate for 127.0.0.1 (CN and IP subjectAltName, valid one day,
    RSA 2048) and its key, written into ``directory``: (cert.pem, key.pem). Being
    self-signed, the certificate is its own CA.

    Raises:
        subprocess.CalledProcessError: openssl failed.
        subprocess.TimeoutExpired: openssl took more than 60 s.
    """
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60)
    key.chmod(0o600)
    return cert, key
