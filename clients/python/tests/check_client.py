"""The Python client against a real `ddpm-worker serve` (started by tests/api_access.rs, on TLS with
tokens). Exits non-zero with the reason on the first check that fails.

    check_client.py basic URL --ca CA --token-file FILE --other-token-file FILE
        submit -> wait -> SUCCEEDED, get, list, the errors each refusal maps to; open_dataset in each
        layout; extend twice.
    check_client.py wait URL --ca CA --token-file FILE
        submits a longer job, prints "job <id>", and waits for it; the test restarts the server
        meanwhile. Prints the final job as JSON.
    check_client.py aio URL --ca CA --token-file FILE
        the asyncio client alone (check_package.py runs it from fresh venvs).
    check_client.py s3 URL --job ID        (AWS_* in the environment, as the server has them)
        extends a parquet job on S3 and opens both through s3fs, whole and streaming.
"""

import argparse
import asyncio
import json
import os
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
        check(job.samples_per_second > 0 and job.estimated_finish_time is None, f"a finished job's pace: {job.to_dict()}")
        manifest = Path(job.manifest_uri.removeprefix("file://"))
        check(manifest.is_file(), f"the manifest is there: {job.manifest_uri}")
        check(json.loads(manifest.read_text())["totals"]["samples"] == 3, "the manifest counts 3 samples")
        check(client.get(job.id).to_dict()["state"] == "JOB_STATE_SUCCEEDED", "get shows the final state")
        stats = client.get(job.id).shard_stats
        check(
            stats is not None
            and stats["attempts"] == job.message.shards_total
            and stats["failed"] == 0
            and sum(stats["runners"].values()) == job.message.shards_total,
            f"get shows how its {job.message.shards_total} shards ran: {stats}",
        )
        listed = [j.id for j in client.list(labels={"via": "python"})]
        check(listed == [job.id], f"the label filter finds the job: {listed}")
        check(job.id in [j.id for j in client.list(states=["succeeded"], limit=10)], "the state filter")
        expect(ddpm.FailedPrecondition, lambda: client.cancel(job.id), "cancelling a finished job")
        expect(ddpm.NotFound, lambda: client.get("no-such-job"), "an unknown job")
        models = client.models()
        check([m.name for m in models] == ["tiny"], f"the server's models: {models}")
        tiny = client.model("tiny")
        check(tiny.shape[0] == 3 and len(tiny.weights_sha256) == 64, f"the model's shape and hash: {tiny.to_dict()}")
        check(set(tiny.schedulers) == {"ddpm", "ddim", "pndm", "dpmsolver"}, f"its schedulers: {tiny.schedulers}")
        check(list(tiny.devices) == ["cpu"], f"the device that samples it: {tiny.devices}")
        expect(ddpm.NotFound, lambda: client.model("no-such-model"), "an unknown model")
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
        expect(ddpm.FailedPrecondition, lambda: queued.extend(1), "extending a job that has not succeeded")
        expect(TimeoutError, lambda: client.get(queued.id).wait(timeout=0.5), "a wait that times out")
    with ddpm.Client(args.url, token_file=args.other_token_file, ca=args.ca) as other:
        check(other.get(queued.id).owner == "alice", "the job's owner is the token's name")
        expect(ddpm.PermissionDenied, lambda: other.cancel(queued.id), "cancelling another's job")
        expect(ddpm.PermissionDenied, lambda: other.delete(queued.id), "deleting another's job")
    with ddpm.Client(args.url, token_file=args.token_file, ca=args.ca) as client:
        check(client.cancel(queued.id).state == "CANCELLED", "the owner cancels its job")
        expect(ddpm.JobCancelled, lambda: client.get(queued.id).wait(), "waiting on a cancelled job")
        datasets_and_extensions(client)
    asyncio_client(args.url, args.ca, args.token_file)
    with ddpm.Client(args.url, token="not-a-token-0123456789", ca=args.ca) as stranger:
        expect(ddpm.Unauthenticated, lambda: stranger.get(job.id), "an unknown token")
    with ddpm.Client(args.url, ca=args.ca) as anonymous:
        expect(ddpm.Unauthenticated, lambda: list(anonymous.list()), "no token")
    print(json.dumps({"ok": True, "job": job.id}))


def datasets_and_extensions(client: ddpm.Client) -> None:
    """open_dataset in each layout, and extensions that continue a job's seeds."""
    import PIL.Image
    import webdataset

    first = client.submit("tiny", 5, scheduler="ddim", steps=2, batch_size=2, seed=100, format="parquet").wait()
    ds = first.open_dataset()
    check(len(ds) == 5 and list(ds["seed"]) == [100, 101, 102, 103, 104], f"the parquet job's samples in order: {ds}")
    check(isinstance(ds[0]["image"], PIL.Image.Image), f"images decode: {type(ds[0]['image'])}")
    more = first.extend(3)
    check(more.extends == first.id and more.seed == 105, f"the extension follows the job: {more.to_dict()}")
    more.wait()
    third = more.extend(2).wait()
    seeds = [s for job in (first, more, third) for s in list(job.open_dataset()["seed"])]
    check(seeds == list(range(100, 110)), f"three jobs, seeds disjoint and contiguous: {seeds}")
    kept = ("model", "scheduler", "steps", "eta", "batch_size", "dataset")
    specs = [{k: job.manifest()["spec"][k] for k in kept} for job in (first, more, third)]
    check(specs[0] == specs[1] == specs[2], f"the same settings: {specs}")
    check(third.manifest()["spec"]["extends"] == more.id, "the manifest names the job it extends")
    bad = expect(ddpm.InvalidArgument, lambda: client.extend("no-such-job", 1), "extending an unknown job")
    check(list(bad.fields) == ["spec.extends"], f"the field is named: {bad.fields}")

    tars = client.submit("tiny", 4, scheduler="ddim", steps=2, batch_size=2, seed=7, format="webdataset").wait()
    urls = tars.open_dataset()
    samples = list(webdataset.WebDataset(urls, shardshuffle=False).decode("pil"))
    check(len(samples) == 4 and all("png" in x for x in samples), f"the webdataset shards: {urls}")
    files = client.submit("tiny", 3, scheduler="ddim", steps=2, batch_size=2, seed=7, format="files").wait()
    check(len(files.open_dataset()) == 3, "the files layout opens as an image folder")


def asyncio_client(url: str, ca: str, token_file: str) -> str:
    """The asyncio client: a job submitted, followed and listed; models; a wait that times out."""

    async def run() -> str:
        async with ddpm.AsyncClient(url, token_file=token_file, ca=ca) as client:
            job = await client.submit("tiny", 3, steps=2, batch_size=2, seed=21)
            check(isinstance(job, ddpm.AsyncJob) and job.state == "QUEUED", f"a new job: {job!r}")
            await job.wait()
            check(job.state == "SUCCEEDED" and job.samples_done == 3, f"the job SUCCEEDED: {job!r} {job.error}")
            listed = [j.id async for j in client.list(states=["succeeded"], limit=50)]
            check(job.id in listed, f"the job is listed: {listed}")
            check([m.name for m in await client.models()] == ["tiny"], "the server's models")
            long = await client.submit("tiny", 64, scheduler="ddpm", steps=1000, batch_size=1)
            try:
                await long.wait(timeout=0.5)
                sys.exit("check failed: a wait with a timeout returned before the job ended")
            except TimeoutError:
                pass
            check((await long.cancel()).state == "CANCELLED", "the long job is cancelled")
            folder = Path(job.manifest_uri.removeprefix("file://")).parent
            deleted = await job.delete()
            check(deleted >= 5 and not folder.exists(), f"the job's {deleted} objects are deleted: {folder}")
            try:
                await job.refresh()
                sys.exit("check failed: a deleted job was found")
            except ddpm.NotFound:
                pass
            try:
                await client.get("no-such-job")
                sys.exit("check failed: an unknown job was found")
            except ddpm.NotFound:
                pass
            return job.id

    return asyncio.run(run())


def s3(args: argparse.Namespace) -> None:
    """A parquet job on S3 (given by the test) extended, and both opened through s3fs."""
    options = {
        "key": os.environ["AWS_ACCESS_KEY_ID"],
        "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"], "region_name": os.environ["AWS_REGION"]},
    }
    with ddpm.Client(args.url) as client:
        first = client.get(args.job)
        check(first.manifest_uri.startswith("s3://"), f"the job is on S3: {first.manifest_uri}")
        more = first.extend(2).wait()
        check(more.manifest_uri.startswith(first.manifest_uri.rsplit("/", 2)[0]), "the same destination")
        seeds = [list(job.open_dataset(storage_options=options)["seed"]) for job in (first, more)]
        n = first.samples_total
        check(seeds == [list(range(first.seed, first.seed + n)), [first.seed + n, first.seed + n + 1]], f"{seeds}")
        streamed = list(more.open_dataset(storage_options=options, streaming=True))
        check([x["seed"] for x in streamed] == seeds[1], f"streaming reads the same: {streamed}")
        print(json.dumps({"ok": True, "jobs": [first.id, more.id]}))


def wait(args: argparse.Namespace) -> None:
    with ddpm.Client(args.url, token_file=args.token_file, ca=args.ca) as client:
        job = client.submit("tiny", args.samples, scheduler="ddpm", steps=args.steps, batch_size=2, seed=11)
        print(f"job {job.id}", flush=True)
        job.wait(reconnect_seconds=120)
        print(json.dumps(job.to_dict()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["basic", "wait", "s3", "aio"])
    parser.add_argument("url")
    parser.add_argument("--ca")
    parser.add_argument("--token-file")
    parser.add_argument("--job")
    parser.add_argument("--other-token-file")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    aio = lambda a: print(json.dumps({"ok": True, "job": asyncio_client(a.url, a.ca, a.token_file)}))  # noqa: E731
    {"basic": basic, "wait": wait, "s3": s3, "aio": aio}[args.mode](args)


if __name__ == "__main__":
    main()
