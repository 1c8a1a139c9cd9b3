"""The Python client against a real `ddpm-worker serve` (started by tests/api_access.rs, on TLS with
tokens). Exits non-zero with the reason on the first check that fails.

    check_client.py basic URL --ca CA --token-file FILE --other-token-file FILE
        submit -> wait -> SUCCEEDED, get, list, the errors each refusal maps to.
    check_client.py wait URL --ca CA --token-file FILE
        submits a longer job, prints "job <id>", and waits for it; the test restarts the server
        meanwhile. Prints the final job as JSON.
"""

import argparse
import json
import sys
from pathlib import Path

import ddpm_worker_client as ddpm


def check(condition: bool, what: str) -> None:
    if not condition:
        sys.exit(f"check failed: {what}")


def expect(error: type, call, what: str) -> ddpm.Error:
    try:
        call()
    except error as e:
        return e
    except Exception as e:  # noqa: BLE001 - the point is to say which one came instead
        sys.exit(f"check failed: {what}: {type(e).__name__} {e} instead of {error.__name__}")
    sys.exit(f"check failed: {what}: no error")


def basic(args: argparse.Namespace) -> None:
    with ddpm.Client(args.url, token_file=args.token_file, ca=args.ca) as client:
        job = client.submit("tiny", 3, scheduler="ddim", steps=3, batch_size=2, seed=7, labels={"via": "python"})
        check(job.state == "QUEUED", f"a new job is QUEUED, not {job.state}")
        check(job.seed == 7 and job.samples_total == 3, f"the job shows its spec: {job!r}")
        job.wait()
        check(job.state == "SUCCEEDED", f"the job SUCCEEDED: {job!r} {job.error}")
        check(job.samples_done == 3, "every sample is done")
        manifest = Path(job.manifest_uri.removeprefix("file://"))
        check(manifest.is_file(), f"the manifest is there: {job.manifest_uri}")
        check(json.loads(manifest.read_text())["totals"]["samples"] == 3, "the manifest counts 3 samples")
        check(client.get(job.id).to_dict()["state"] == "JOB_STATE_SUCCEEDED", "get shows the final state")
        listed = [j.id for j in client.list(labels={"via": "python"})]
        check(listed == [job.id], f"the label filter finds the job: {listed}")
        check(job.id in [j.id for j in client.list(states=["succeeded"], limit=10)], "the state filter")
        expect(ddpm.FailedPrecondition, lambda: client.cancel(job.id), "cancelling a finished job")
        expect(ddpm.NotFound, lambda: client.get("no-such-job"), "an unknown job")
        bad = expect(ddpm.InvalidArgument, lambda: client.submit("tiny", 0, steps=0), "a bad submission")
        check({"spec.num_samples", "spec.sampling.steps"} <= set(bad.fields), f"the bad fields are named: {bad.fields}")
        outside = expect(
            ddpm.PermissionDenied,
            lambda: client.submit("tiny", 1, scheduler="ddim", steps=1, destination="file:/etc"),
            "a destination outside the allowed ones",
        )
        check("output.destination" in outside.message, f"the field is named: {outside.message}")
        # Another caller (a submit token of someone else) may read the job but not cancel it.
        queued = client.submit("tiny", 64, scheduler="ddpm", steps=1000, batch_size=1)
    with ddpm.Client(args.url, token_file=args.other_token_file, ca=args.ca) as other:
        check(other.get(queued.id).owner == "alice", "the job's owner is the token's name")
        expect(ddpm.PermissionDenied, lambda: other.cancel(queued.id), "cancelling another's job")
    with ddpm.Client(args.url, token_file=args.token_file, ca=args.ca) as client:
        check(client.cancel(queued.id).state == "CANCELLED", "the owner cancels its job")
        expect(ddpm.JobCancelled, lambda: client.get(queued.id).wait(), "waiting on a cancelled job")
    with ddpm.Client(args.url, token="not-a-token-0123456789", ca=args.ca) as stranger:
        expect(ddpm.Unauthenticated, lambda: stranger.get(job.id), "an unknown token")
    with ddpm.Client(args.url, ca=args.ca) as anonymous:
        expect(ddpm.Unauthenticated, lambda: list(anonymous.list()), "no token")
    print(json.dumps({"ok": True, "job": job.id}))


def wait(args: argparse.Namespace) -> None:
    with ddpm.Client(args.url, token_file=args.token_file, ca=args.ca) as client:
        job = client.submit("tiny", args.samples, scheduler="ddpm", steps=args.steps, batch_size=2, seed=11)
        print(f"job {job.id}", flush=True)
        job.wait(reconnect_seconds=120)
        print(json.dumps(job.to_dict()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["basic", "wait"])
    parser.add_argument("url")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--other-token-file")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    basic(args) if args.mode == "basic" else wait(args)


if __name__ == "__main__":
    main()
