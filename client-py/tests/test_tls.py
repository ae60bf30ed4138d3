"""TLS through the Python binding: a gateway that requires client certificates
(mutual TLS), a client with one its CA signed, one without, one without TLS.
The certificates are made here with `cryptography`."""

import datetime
import ipaddress

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import dualpath
from conftest import BLOCK_BYTES, Gateway, synthetic_block


def _certificate(subject, issuer_name, issuer_key, key, *, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if server else [x509.DNSName(subject)]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, key, cert):
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".crt")
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _pki(directory, name):
    """A CA, a server certificate for 127.0.0.1 and a client certificate `name`, all signed by it."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = _certificate(f"{name} test CA", ca_name, ca_key, ca_key, ca=True)
    ca_path, _ = _write(directory / f"{name}-ca", ca_key, ca)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _write(directory / f"{name}-server", server_key, _certificate("gateway", ca_name, ca_key, server_key, server=True))
    client = _write(directory / f"{name}-client", client_key, _certificate(name, ca_name, ca_key, client_key))
    return ca_path, server, client


@pytest.fixture
def mtls_gateway(tmp_path):
    ca, (server_cert, server_key), client = _pki(tmp_path, "pe-1")
    lines = f'tls_cert_file = "{server_cert}"\ntls_key_file = "{server_key}"\ntls_client_ca_file = "{ca}"'
    instance = Gateway(tmp_path, gateway_lines=lines)
    instance.ca, instance.client_identity = ca, client
    yield instance
    instance.stop()


def test_client_certificates_through_the_binding(mtls_gateway, tmp_path):
    gateway = mtls_gateway
    cert, key = gateway.client_identity
    client = dualpath.Client([gateway.address], tls_ca_file=str(gateway.ca), tls_cert_file=str(cert), tls_key_file=str(key))
    kv = np.zeros(4 * BLOCK_BYTES, dtype=np.uint8)
    region = client.register(memoryview(kv).cast("B"))
    offsets = [index * BLOCK_BYTES for index in range(4)]
    states = client.load("kv", region, gateway.keys[:4], offsets).wait(timeout=30)
    assert all(state == "done" for state, _, _ in states)
    for index, key_value in enumerate(gateway.keys[:4]):
        assert kv[index * BLOCK_BYTES:(index + 1) * BLOCK_BYTES].tobytes() == synthetic_block(key_value)
    # Requests bigger than the 64 KiB of records the TLS session buffers go out
    # whole: a batch of stores, a lookup and a removal of 40,000 keys.
    tokens = list(range(4 * client.namespace("kv")["tokens_per_block"]))
    keys = client.prefix_keys("kv", tokens)
    client.store_many("kv", [(key, bytes([index]) * BLOCK_BYTES) for index, key in enumerate(keys)])
    many = keys + [index + 1 for index in range(40_000)]
    assert client.lookup("kv", many) == [True] * len(keys) + [False] * 40_000
    assert client.remove("kv", many) == [True] * len(keys) + [False] * 40_000
    client.close()

    with pytest.raises(dualpath.DualpathError, match="requires a client certificate"):
        dualpath.Client([gateway.address], tls_ca_file=str(gateway.ca), connect_timeout=2.0, request_timeout=2.0)
    _, _, (other_cert, other_key) = _pki(tmp_path, "stranger")
    with pytest.raises(dualpath.DualpathError, match="did not accept this client's certificate"):
        dualpath.Client(
            [gateway.address], tls_ca_file=str(gateway.ca), tls_cert_file=str(other_cert), tls_key_file=str(other_key),
            connect_timeout=2.0, request_timeout=2.0,
        )
    with pytest.raises(dualpath.DualpathError):
        dualpath.Client([gateway.address], connect_timeout=2.0, request_timeout=2.0)
    with pytest.raises(dualpath.DualpathError, match="both cert_file and key_file"):
        dualpath.Client([gateway.address], tls_ca_file=str(gateway.ca), tls_cert_file=str(cert))
