"""Builds the package with its gRPC stubs generated from the service's proto files.

The stubs go to ddpm_worker_client/_pb (so no top-level `ddpm` package is installed): the proto is
compiled as ddpm_worker_client/_pb/ddpm/v1/worker.proto, which keeps its package (ddpm.v1) and so the
RPC paths and message names, while the generated imports point inside this package.
google.rpc.Status comes from googleapis-common-protos.
"""

import os
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO = "ddpm/v1/worker.proto"
TARGET = Path("ddpm_worker_client/_pb")


def proto_root() -> Path:
    """The proto/ folder of the repository (or DDPM_PROTO_DIR)."""
    for candidate in [os.environ.get("DDPM_PROTO_DIR"), HERE / "proto", HERE.parent.parent / "proto"]:
        if candidate and (Path(candidate) / PROTO).is_file():
            return Path(candidate)
    raise RuntimeError(f"{PROTO} not found: build from the repository, or set DDPM_PROTO_DIR")


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    root = proto_root()
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / TARGET / PROTO
        source.parent.mkdir(parents=True)
        shutil.copy(root / PROTO, source)
        args = [
            "grpc_tools.protoc",
            f"-I{tmp}",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(TARGET / PROTO),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {root / PROTO}")
    for package in [TARGET, TARGET / "ddpm", TARGET / "ddpm/v1"]:
        (out / package / "__init__.py").touch()


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        generate(Path(self.build_lib))


class SdistWithProto(sdist):
    """Puts the proto files into the sdist (as proto/), so that a wheel builds from it anywhere."""

    def make_release_tree(self, base_dir: str, files: list) -> None:
        super().make_release_tree(base_dir, files)
        root = proto_root()
        for name in (PROTO, "google/rpc/status.proto"):
            target = Path(base_dir) / "proto" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / name, target)


setup(cmdclass={"build_py": BuildWithStubs, "sdist": SdistWithProto})
