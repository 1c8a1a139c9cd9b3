"""Opens a finished job's output with the tools people train with, and checks it against its manifest.

    python check_dataset.py JOB_DIR [--reference FILES_JOB_DIR]

JOB_DIR is a job's folder (local, or a copy of the objects of an S3 job) or a `generate` run's. Checks, failing loudly:
- pyarrow reads every index part the manifest lists: each sample 0..n-1 exactly once, its seed, and the
  SHA-256 and size of the bytes where the index says they are (object, tar member at its offset, or
  Parquet row);
- every data file and index part has the SHA-256 and size the manifest lists, and nothing else is in
  data/ or index/;
- webdataset: the `webdataset` library iterates every sample (image and JSON), and
  `datasets.load_dataset("webdataset", ...)` loads and decodes them;
- parquet: `datasets.load_dataset("parquet", ...)` decodes the `image` column as images;
- the folder loads as a dataset by itself: `datasets.load_dataset(JOB_DIR)`, with no data_files, finds the
  samples through the dataset card's YAML configs (and, in the Parquet layout, the index as its `index`
  config);
- webdataset: `wids.ShardListDataset` reads the shard index (data/wids.json) and gives sample i at i;
- with --reference (the `files` layout of the same job), the decoded pixels equal its PNGs (lossless
  formats);
- a labelled job (a class-conditional model's): each sample's label, a function of its index and the
  spec's class counts, is in the index (label, label_name), in the manifest's per-class counts, in
  webdataset's `cls` member, in the Parquet layout's `label` column (a `ClassLabel` of the class names
  for `datasets`), and in the files layout's folder per class (`samples/<name>/`, which `datasets`'
  imagefolder turns into its `label`, as torchvision's ImageFolder would: checked directly when
  torchvision is not installed).
Prints a JSON summary on success.
"""

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fail(message: str):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def check(cond: bool, message: str):
    if not cond:
        fail(message)


def image_bytes(job: Path, row: dict) -> bytes:
    path = job / row["file"]
    if row["offset"] is not None:
        with open(path, "rb") as f:
            f.seek(row["offset"])
            return f.read(row["bytes"])
    if row["row"] is not None:
        table = pq.read_table(path, columns=["image"])
        return table.column("image")[row["row"]].as_py()["bytes"]
    return path.read_bytes()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def normalized(manifest: dict) -> dict:
    """A `generate` run's manifest in a job manifest's shape (one index part, the spec's fields)."""
    if "spec" in manifest:
        return manifest
    return {
        **manifest,
        "spec": {"num_samples": manifest["num_samples"], "seed": manifest["seed"], "dataset": manifest["dataset"]},
        "index": [manifest["index"]],
        "totals": {"samples": manifest["num_samples"]},
    }


def raw(data) -> bytes:
    return data.read() if hasattr(data, "read") else bytes(data)


def expected_labels(spec: dict):
    """Each sample's (label, name) for a labelled job's spec, else None: the classes in ascending order
    take their counts of consecutive indices."""
    classes = spec.get("classes")
    if not classes:
        return None
    names = classes.get("names", [])
    labels = []
    for cls, count in sorted((int(k), v) for k, v in classes["counts"].items()):
        labels += [(cls, names[cls] if cls < len(names) else str(cls))] * count
    return labels


def check_labels(job: Path, fmt: str, manifest: dict, rows: list, want: list, summary: dict):
    """The labels wherever a layout keeps them (besides the readers' own checks in main)."""
    from collections import Counter

    for r in rows:
        label, name = want[r["index"]]
        check((r["label"], r["label_name"]) == (label, name), f"index: sample {r['index']} labelled {r['label']}, {r['label_name']!r}")
    counts = Counter(label for label, _ in want)
    listed = {c["label"]: c["samples"] for c in manifest.get("classes", [])}
    check(listed == dict(counts), f"manifest classes {listed} != {dict(counts)}")
    names = {c["label"]: c["name"] for c in manifest.get("classes", [])}
    check(all(names[label] == name for label, name in want), "manifest class names")
    if fmt == "files":
        for r in rows:
            parent = Path(r["file"]).parent
            check(parent.parent == Path("samples") and parent.name == want[r["index"]][1],
                  f"sample {r['index']} is at {r['file']}, not in its class's folder")
        try:
            from torchvision.datasets import ImageFolder
        except ImportError:
            summary["imagefolder"] = "torchvision not installed: the folder per class checked directly"
        else:
            folder = ImageFolder(str(job / "samples"))
            by_path = {str(job / r["file"]): want[r["index"]][1] for r in rows}
            for path, target in folder.samples:
                check(folder.classes[target] == by_path[path], f"torchvision ImageFolder: {path}")
            summary["imagefolder"] = len(folder.samples)
    summary["labelled"] = dict(sorted(counts.items()))


def whole_folder(job: Path, fmt: str, n: int, seed: int, rows: list, decoded: dict, cache: str, summary: dict,
                 labels=None):
    """The folder as a data team opens it: `load_dataset(<folder>)` with no data_files (the card's
    configs), the index config, and for WebDataset the wids shard index."""
    from datasets import load_dataset

    ds = load_dataset(str(job), split="train", cache_dir=cache)
    check(len(ds) == n, f"load_dataset(<folder>) gives {len(ds)} of {n} samples ({fmt})")
    by_index = {r["index"]: r for r in rows}
    if fmt == "files":
        # imagefolder, in file name order: samples/<index:08>.<ext>, or samples/<class>/<index:08>.<ext>
        # for a labelled job, whose folder names become its ClassLabel.
        order = [r["index"] for r in sorted(rows, key=lambda r: r["file"])]
        for k, ex in enumerate(ds):
            i = order[k]
            want = decoded.get(i)
            got = np.asarray(ex["image"])
            if want is not None and want.shape == got.shape:
                check(np.array_equal(got, want), f"load_dataset(<folder>): sample {i} pixels")
            if labels is not None:
                name = ds.features["label"].int2str(ex["label"])
                check(name == labels[i][1], f"load_dataset(<folder>): sample {i} labelled {name!r}")
    elif fmt == "webdataset":
        keys = sorted(int(ex["__key__"]) for ex in ds)
        check(keys == list(range(n)), "load_dataset(<folder>): webdataset keys")
    else:
        check(sorted(ds["index"]) == list(range(n)), "load_dataset(<folder>): parquet rows")
        check(all(s == seed + i for i, s in zip(ds["index"], ds["seed"])), "load_dataset(<folder>): seeds")
    # `datasets` reads all of a folder's configs with one builder: the index is a config of the Parquet
    # layout, and is loaded as Parquet by name in the others (as their cards say).
    if fmt == "parquet":
        index = load_dataset(str(job), "index", split="train", cache_dir=cache)
    else:
        import yaml

        front = (job / "README.md").read_text().split("---\n")[1]
        names = [c["config_name"] for c in yaml.safe_load(front)["configs"]]
        check(names == ["default"], f"the card's configs are {names}: datasets cannot load an index config here")
        index = load_dataset("parquet", data_files=str(job / "index" / "*.parquet"), split="train", cache_dir=cache)
    check(sorted(index["index"]) == list(range(n)), "load_dataset(<folder>, 'index') rows")
    check(all(by_index[i]["sha256"] == h for i, h in zip(index["index"], index["sha256"])),
          "load_dataset(<folder>, 'index'): SHA-256")
    summary["folder_rows"] = len(ds)
    if fmt == "webdataset":
        import wids

        shards = wids.ShardListDataset(str(job / "data" / "wids.json"), cache_dir=os.path.join(cache, "wids"),
                                       transformations=[])
        check(len(shards) == n, f"wids gives {len(shards)} of {n} samples")
        for i in range(n):
            sample = shards[i]
            check(int(sample["__key__"].split("/")[-1]) == i, f"wids: sample {i} has key {sample['__key__']}")
            image = next(v for k, v in sample.items() if k.lstrip(".") in ("png", "webp", "jpg"))
            check(sha256(raw(image)) == by_index[i]["sha256"], f"wids: sample {i} bytes differ from the index")
        summary["wids_samples"] = len(shards)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("job", type=Path)
    parser.add_argument("--reference", type=Path)
    args = parser.parse_args()
    job = args.job
    manifest = normalized(json.loads((job / "manifest.json").read_text()))
    spec = manifest["spec"]
    n, seed = spec["num_samples"], spec["seed"]
    dataset = spec["dataset"]
    fmt, image_format = dataset["format"], dataset["image"]
    lossless = image_format in ("png", "webp")
    labels = expected_labels(spec)

    # Every listed file (the dataset card and wids index too) is there with its listed SHA-256 and size,
    # and nothing unlisted.
    listed = manifest["index"] + manifest["files"] + manifest.get("metadata", [])
    check((job / "README.md").exists() and any(f["path"] == "README.md" for f in listed),
          "the job folder has no dataset card listed in its manifest")
    for f in listed:
        data = (job / f["path"]).read_bytes()
        check(sha256(data) == f["sha256"], f"{f['path']}: SHA-256 differs from the manifest")
        check(len(data) == f["bytes"], f"{f['path']}: size differs from the manifest")
    for folder in ("data", "index"):
        present = {str(p.relative_to(job)) for p in (job / folder).glob("*")} if (job / folder).exists() else set()
        check(present == {f["path"] for f in listed if f["path"].startswith(folder + "/")},
              f"{folder}/ holds files the manifest does not list (or misses some): {sorted(present)[:5]}")
    check(manifest["totals"]["samples"] == n, "totals.samples")

    # The index, as pyarrow reads it.
    rows = []
    for part in manifest["index"]:
        table = pq.read_table(job / part["path"])
        rows.extend(table.to_pylist())
    check(sorted(r["index"] for r in rows) == list(range(n)), "the index does not list each sample once")
    rows.sort(key=lambda r: r["index"])
    by_sha = {}
    for r in rows:
        check(r["seed"] == seed + r["index"], f"sample {r['index']}: seed {r['seed']}")
        data = image_bytes(job, r)
        check(len(data) == r["bytes"], f"sample {r['index']}: size")
        check(sha256(data) == r["sha256"], f"sample {r['index']}: SHA-256 of the stored bytes differs from the index")
        by_sha[r["index"]] = r["sha256"]

    decoded = {}
    summary = {"format": fmt, "image_format": image_format, "samples": n, "index_rows": len(rows),
               "data_files": len(manifest["files"]), "index_parts": len(manifest["index"])}
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as cache:
        if fmt == "webdataset":
            import webdataset as wds

            tars = [str(job / f["path"]) for f in manifest["files"]]
            seen = {}
            for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
                key = int(sample["__key__"])
                ext = "jpg" if image_format == "jpeg" else image_format
                check(key not in seen, f"webdataset yields sample {key} twice")
                meta = json.loads(sample["json"])
                check(meta["index"] == key and meta["seed"] == seed + key, f"sample {key}: JSON {meta}")
                check(meta["model"]["sha256"] == manifest["model"]["sha256"], "JSON model sha256")
                check(sha256(sample[ext]) == by_sha[key], f"sample {key}: webdataset bytes differ from the index")
                if labels is not None:
                    check(int(sample["cls"]) == labels[key][0], f"sample {key}: webdataset cls {sample.get('cls')}")
                    check(meta["label"] == labels[key][0], f"sample {key}: JSON label")
                seen[key] = True
            check(sorted(seen) == list(range(n)), f"webdataset iterated {len(seen)} of {n} samples")
            summary["webdataset_samples"] = len(seen)

            from datasets import load_dataset

            ds = load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=cache)
            check(len(ds) == n, f"datasets loads {len(ds)} of {n} webdataset samples")
            col = "jpg" if image_format == "jpeg" else image_format
            for ex in ds:
                key = int(ex["__key__"])
                decoded[key] = np.asarray(ex[col])
                check(ex["json"]["seed"] == seed + key, f"datasets: sample {key} seed")
            summary["datasets_rows"] = len(ds)
        elif fmt == "parquet":
            from datasets import Image as HFImage
            from datasets import load_dataset

            files = [str(job / f["path"]) for f in manifest["files"]]
            for f in files:
                meta = pq.ParquetFile(f).metadata
                check(all(meta.row_group(i).num_rows <= 100 for i in range(meta.num_row_groups)),
                      f"{f}: row groups of more than 100 rows")
            ds = load_dataset("parquet", data_files={"train": files}, split="train", cache_dir=cache)
            check(isinstance(ds.features["image"], HFImage), f"image column decodes as {ds.features['image']}")
            if labels is not None:
                from datasets import ClassLabel

                feature = ds.features["label"]
                check(isinstance(feature, ClassLabel), f"label column is {feature}, not a ClassLabel")
                for cls, name in labels:
                    check(feature.int2str(cls) == name, f"ClassLabel names {feature.names}")
                summary["class_label_names"] = feature.names
            check(len(ds) == n, f"datasets loads {len(ds)} of {n} parquet rows")
            for ex in ds:
                key = ex["index"]
                check(ex["seed"] == seed + key, f"datasets: sample {key} seed")
                decoded[key] = np.asarray(ex["image"])
                if labels is not None:
                    check(ex["label"] == labels[key][0], f"datasets: sample {key} label {ex['label']}")
            check(sorted(decoded) == list(range(n)), "datasets: parquet rows are not each sample once")
            summary["datasets_rows"] = len(ds)
        else:
            for r in rows:
                decoded[r["index"]] = pixels(image_bytes(job, r))

        whole_folder(job, fmt, n, seed, rows, decoded, cache, summary, labels)
        if labels is not None:
            check_labels(job, fmt, manifest, rows, labels, summary)

    if args.reference is not None and lossless:
        ref = normalized(json.loads((args.reference / "manifest.json").read_text()))
        ref_rows = []
        for part in ref["index"]:
            ref_rows.extend(pq.read_table(args.reference / part["path"]).to_pylist())
        check(len(ref_rows) == n, "the reference job has another sample count")
        for r in ref_rows:
            want = pixels((args.reference / r["file"]).read_bytes())
            got = decoded[r["index"]]
            if got.ndim == 3 and want.ndim == 2:
                # WebP has no grayscale mode: a gray sample comes back as equal R, G and B.
                check(all(np.array_equal(got[..., c], want) for c in range(got.shape[2])),
                      f"sample {r['index']}: decoded pixels differ from the files layout's PNG")
                continue
            check(got.shape == want.shape and np.array_equal(got, want),
                  f"sample {r['index']}: decoded pixels differ from the files layout's PNG")
        summary["pixels_equal_reference"] = n
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
