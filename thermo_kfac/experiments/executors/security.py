"""TLS for the Dask clusters of the executors: the ``--tls``/``--no-tls``, ``--tls-ca-file``,
``--tls-cert`` and ``--tls-key`` flags as a Dask ``distributed.Security``.

Dask's TLS is mutual: the scheduler, the workers and the client each present a certificate signed
by the CA and accept only peers whose certificate is, so a peer without one cannot connect
(neither to read results nor to run code on the workers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thermo_kfac.experiments.executors.base import CLUSTER_EXTRA

CONFIG_KEYS = "distributed.comm.tls.ca-file and .client.cert/.client.key (.scheduler/.worker for clusters)"


@dataclass(frozen=True)
class TLSOptions:
    """TLS settings for a Dask cluster.

    ``enabled``: None keeps the default of each kind of cluster (``--workers N``: plain TCP on
    loopback unless Dask's configuration requires TLS; ``--cluster tls://...``: Dask's configured
    certificates; ``--cluster slurm``: TLS), True requires TLS, False turns it off (only
    ``--cluster slurm`` has it on by default). ``ca_file``/``cert``/``key``: PEM files (``key``
    may be left out when ``cert`` holds the key too); giving them implies TLS."""

    enabled: bool | None = None
    ca_file: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if self.enabled not in (None, True, False):
            raise ValueError(f"TLSOptions(enabled={self.enabled!r}) must be None, True or False")
        files = {"--tls-ca-file": self.ca_file, "--tls-cert": self.cert, "--tls-key": self.key}
        given = {flag for flag, path in files.items() if path is not None}
        if given and self.enabled is False:
            raise ValueError(f"{', '.join(sorted(given))} and --no-tls contradict each other")
        if given and (self.ca_file is None or self.cert is None):
            raise ValueError(f"{', '.join(sorted(given))} given: TLS needs both --tls-ca-file (the CA "
                             "that signed the peers' certificates) and --tls-cert (this side's "
                             "certificate; --tls-key if its key is in another file)")
        for flag, path in files.items():
            if path is not None and not Path(path).expanduser().is_file():
                raise ValueError(f"{flag} {path!r}: no such file")

    @property
    def has_files(self) -> bool:
        return self.cert is not None

    @property
    def requested(self) -> bool:
        """Whether TLS was asked for explicitly (``--tls`` or certificate files)."""
        return self.enabled is True or self.has_files


def configured_security() -> Any | None:
    """Dask's configured TLS (``distributed.comm.tls.*``) as a ``Security`` requiring encryption,
    or None when no CA file is configured."""
    from distributed import Security

    security = Security()
    if not security.tls_ca_file:
        return None
    return Security(require_encryption=True)


def file_security(tls: TLSOptions) -> Any:
    """A ``Security`` using ``tls``'s files for every role (client, scheduler, worker)."""
    from distributed import Security

    ca, cert = str(Path(tls.ca_file).expanduser()), str(Path(tls.cert).expanduser())
    key = None if tls.key is None else str(Path(tls.key).expanduser())
    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, tls_scheduler_cert=cert,
                    tls_scheduler_key=key, tls_worker_cert=cert, tls_worker_key=key,
                    require_encryption=True)


def temporary_security(what: str) -> Any:
    """A ``Security`` with a self-signed certificate made now, for a cluster started here."""
    from distributed import Security

    try:
        return Security.temporary()
    except ImportError:
        opt_out = ", or --no-tls on a network you trust" if what == "--cluster slurm" else ""
        raise ValueError(f"TLS for {what} without certificate files needs the cryptography package "
                         f"({CLUSTER_EXTRA}, or pip install cryptography), or give --tls-ca-file/"
                         f"--tls-cert/--tls-key, or set {CONFIG_KEYS} in Dask's configuration"
                         f"{opt_out}") from None


def security_for(kind: str, tls: TLSOptions | Any | None, address: str = "") -> Any | None:
    """The ``Security`` for a cluster of ``kind`` (``"local"``, ``"address"`` or ``"slurm"``), or
    None for Dask's own configuration. A ``distributed.Security`` passed as ``tls`` is used as is."""
    if tls is not None and not isinstance(tls, TLSOptions):
        return tls  # a distributed.Security from Python
    tls = tls or TLSOptions()
    if tls.has_files:
        return file_security(tls)
    if kind == "address":
        scheme = address.split("://")[0].lower() if "://" in address else "tcp"
        if scheme == "tls" or tls.enabled:
            security = configured_security()
            if security is None:
                raise ValueError(f"--cluster {address} needs TLS certificates: --tls-ca-file, --tls-cert "
                                 f"(and --tls-key), or {CONFIG_KEYS} in Dask's configuration")
            return security
        return None
    if kind == "slurm":
        if tls.enabled is False:
            return None
        return configured_security() or temporary_security("--cluster slurm")
    if kind == "local":
        if not tls.enabled:
            return None  # plain TCP on loopback, or whatever Dask's configuration requires
        return configured_security() or temporary_security("--workers")
    raise ValueError(f"kind={kind!r}; allowed: local, address, slurm")
