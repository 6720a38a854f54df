"""Why a connection to a broker failed, in the operator's words, asked of the network when the error alone
is ambiguous.

A plain client on a TLS port and a TLS client on a plain port both end in a reset or a closed socket,
and a certificate issued for another name fails verification without saying which names it holds.
One short look settles each: a TLS handshake on the port, a plain MQTT CONNECT, or the certificate
itself (read without verifying it, only to name its subject alternative names). Each look is bounded
by `PROBE_TIMEOUT_S`, runs only on a failure, and never sends credentials.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl

from cryptography import x509

PROBE_TIMEOUT_S = 1.0
# A minimal MQTT 3.1.1 CONNECT: clean session, keepalive 10 s, client id "edgefleet-probe".
_PLAIN_CONNECT = bytes([0x10, 27, 0, 4]) + b"MQTT" + bytes([4, 0x02, 0, 10, 0, 15]) + b"edgefleet-probe"
_CONNACK = 0x20
_NAME_MISMATCH = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
# TLS 1.3 alerts about the client's certificate arrive after the handshake, as the first read fails
_CLIENT_CERT_ALERTS = {"certificate required", "unknown ca", "bad certificate", "certificate expired",
                       "certificate revoked", "certificate unknown", "unsupported certificate"}
_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}

__all__ = ["PROBE_TIMEOUT_S", "certificate_names", "connect_failure", "closed_before_connack", "speaks_plain_mqtt",
           "speaks_tls"]


def _no_verify() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def speaks_tls(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the port completes a TLS handshake."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                _no_verify().wrap_socket(sock, server_hostname=host):
            return True
    except (OSError, ValueError):
        return False


def speaks_plain_mqtt(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the port answers a plain MQTT CONNECT with a CONNACK (of any verdict)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_PLAIN_CONNECT)
            first = sock.recv(1)
            return bool(first) and first[0] == _CONNACK
    except OSError:
        return False


def certificate_names(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> list[str]:
    """The DNS names and IP addresses the port's TLS certificate is for (its subject alternative names)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                _no_verify().wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError):
        return []
    if not der:
        return []
    try:
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, x509.ExtensionNotFound):
        return []
    names: list[str] = [str(n) for n in san.value.get_values_for_type(x509.DNSName)]
    names += [str(a) for a in san.value.get_values_for_type(x509.IPAddress)]
    return names


def _url(tls: bool, host: str, port: int) -> str:
    return f"{'mqtts' if tls else 'mqtt'}://{f'[{host}]' if ':' in host else host}:{port}"


def connect_failure(err: OSError, *, tls: bool, host: str, port: int) -> str:
    """What an exception raised while opening the connection (TCP, then TLS) means, probing when needed."""
    where = f"{host}:{port}"
    if isinstance(err, ssl.SSLCertVerificationError):
        if err.verify_code in _NAME_MISMATCH:
            names = certificate_names(host, port)
            if names:
                fix = f"; connect to {_url(True, names[0], port)}" if "*" not in names[0] else ""  # not to a wildcard
                return (f"certificate name mismatch: the broker's certificate is for {', '.join(names)}, "
                        f"not {host}{fix} (or issue a certificate with {host} in its subject alternative names)")
            return f"certificate name mismatch: the broker's certificate is not for {host}"
        return f"TLS certificate verification failed: {err.verify_message} (is the CA the one that issued the broker's certificate?)"
    if isinstance(err, ConnectionRefusedError):
        return f"connection refused: nothing listens on {where} (is the broker running, is the port right?)"
    if isinstance(err, socket.gaierror):
        return f"unknown host {host}: {err.strerror or err}"
    if err.errno in _UNREACHABLE:
        return f"{host} is unreachable: {err.strerror} (check the address and the network)"
    if isinstance(err, TimeoutError):
        return f"no answer from {where} (a firewall dropping packets, or the wrong host)"
    if tls and speaks_plain_mqtt(host, port):
        return f"TLS not expected: {where} speaks plain MQTT; use {_url(False, host, port)}, or the broker's TLS port"
    if isinstance(err, ssl.SSLError):
        return f"TLS error: {err.reason or err}"
    return err.strerror or str(err) or type(err).__name__


def closed_before_connack(why: str, *, tls: bool, host: str, port: int) -> str | None:
    """What a connection closed before the broker's CONNACK (for the reason `why`) means, when the reason
    or a probe can tell; else None."""
    if tls:
        alert = re.search(r"alert ([a-z ]+)", why.lower())
        if alert is None or alert.group(1).strip() not in _CLIENT_CERT_ALERTS:
            return None
        if alert.group(1).strip() == "certificate required":
            return "the broker requires a client certificate (TLS alert: certificate required): give one and its key"
        return f"the broker refused the client certificate (TLS alert: {alert.group(1).strip()})"
    if speaks_tls(host, port):
        return f"TLS expected: {host}:{port} speaks TLS; use {_url(True, host, port)}"
    return None
