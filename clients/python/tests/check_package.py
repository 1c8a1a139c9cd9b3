"""The client as a package: `python -m build` makes an sdist and a wheel outside the repository's tree,
each installs into a fresh venv with no index but WHEELS (what `make test` downloaded for them), and a
job runs through the asyncio client from each.

    check_package.py WHEELS WORK URL --ca CA --token-file FILE
"""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENT = HERE.parent
REPO = CLIENT.parent.parent


def run(*args: object, **kwargs) -> None:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        sys.exit(f"check failed: {' '.join(map(str, args))}: exit {done.returncode}\n{done.stdout}{done.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("wheels", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("url")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--token-file", required=True)
    args = parser.parse_args()
    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(args.wheels)}

    # A copy of what the build reads (the client and the proto), so nothing is written into the tree.
    source = args.work / "src"
    shutil.copytree(CLIENT, source / "clients/python", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    shutil.copytree(REPO / "proto", source / "proto")
    dist = args.work / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, source / "clients/python", env=offline)
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        sys.exit(f"check failed: one sdist and one wheel: {sorted(p.name for p in dist.iterdir())}")
    # The sdist carries the proto itself: a wheel builds from it with no repository around.
    names = subprocess.run(["tar", "tzf", sdists[0]], capture_output=True, text=True, check=True).stdout
    if "/proto/ddpm/v1/worker.proto" not in names:
        sys.exit(f"check failed: the sdist lacks the proto:\n{names}")

    for artifact in (wheels[0], sdists[0]):
        venv = args.work / f"venv-{artifact.suffix.lstrip('.')}"
        run(sys.executable, "-m", "venv", venv)
        run(venv / "bin/pip", "install", "--quiet", artifact, env=offline)
        run(venv / "bin/python", HERE / "check_client.py", "aio", args.url, "--ca", args.ca,
            "--token-file", args.token_file, cwd=args.work)
        print(f"{artifact.name}: installed, a job ran through asyncio")


if __name__ == "__main__":
    main()
