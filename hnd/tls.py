"""TLS for split serving with the standard ``ssl`` module (TLS 1.3 only), and a self-signed
certificate for tests and trials made with ``cryptography`` (the deploy extra)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from hnd.errors import HndError


def server_context(cert: str | os.PathLike, key: str | os.PathLike) -> ssl.SSLContext:
    """A TLS 1.3 server context with the certificate chain in ``cert`` and its key in ``key``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise HndError(f"cannot read TLS file {exc.filename}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise HndError(f"cannot use TLS certificate {cert} with key {key}: {exc}") from None
    return context


def client_context(ca: str | os.PathLike | None = None) -> ssl.SSLContext:
    """A TLS 1.3 client context that checks the server's certificate and name against ``ca``
    (a PEM file of trusted certificates), else against the system's trust store."""
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
    except FileNotFoundError:
        raise HndError(f"cannot read TLS CA file {ca}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise HndError(f"cannot use {ca} as TLS CA file: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def make_self_signed(out_dir: str | os.PathLike, names: tuple[str, ...] = ("localhost", "127.0.0.1"),
                     days: int = 30) -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` (an ECDSA P-256 key) into ``out_dir``: a self-signed
    certificate for ``names`` (DNS names or IP addresses). Clients trust it with
    ``--tls-ca cert.pem``. Returns (cert, key)."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise HndError("making a certificate needs the `cryptography` package (pip install -e '.[deploy]')") from None
    from hnd.files import atomic_write

    key = ec.generate_private_key(ec.SECP256R1())
    alt = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    atomic_write(out / "key.pem", lambda f: f.write(key_pem))
    os.chmod(out / "key.pem", 0o600)
    atomic_write(out / "cert.pem", lambda f: f.write(cert.public_bytes(serialization.Encoding.PEM)))
    return out / "cert.pem", out / "key.pem"
