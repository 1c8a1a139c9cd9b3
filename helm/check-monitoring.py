"""Checks the chart's monitoring objects in a render (helm/check.sh runs it with the python of
kubernetes-validate's venv, which has pyyaml):

    check-monitoring.py RENDER.yaml OUT_DIR SRC_DIR

Writes the PrometheusRule's spec to OUT_DIR/rules.yaml (for promtool) and checks the dashboard
ConfigMap: its JSON parses, panel ids are unique, every target has a PromQL expression, and every
ddpm_* series the dashboard or the rules read is one the code emits (a metrics! call in SRC_DIR).
Prints one line per problem and exits 1 if there is any.
"""

import json
import re
import sys
from pathlib import Path

import yaml

SUFFIXES = ("_bucket", "_sum", "_count")


def emitted(src: Path) -> set[str]:
    pattern = re.compile(r'metrics::(?:counter|gauge|histogram)!\(\s*"(ddpm_[a-z_]+)"')
    return {m for f in src.rglob("*.rs") for m in pattern.findall(f.read_text())}


def base(series: str) -> str:
    for suffix in SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def main() -> int:
    render, out, src = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    docs = [d for d in yaml.safe_load_all(render.read_text()) if d]
    problems = []
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    dashboards = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    if len(rules) != 1 or len(dashboards) != 1:
        problems.append(f"expected one PrometheusRule and one dashboard ConfigMap, found {len(rules)} and {len(dashboards)}")
        print("\n".join(problems))
        return 1
    (out / "rules.yaml").write_text(yaml.safe_dump(rules[0]["spec"]))
    exprs = [r["expr"] for g in rules[0]["spec"]["groups"] for r in g["rules"]]

    (text,) = dashboards[0]["data"].values()
    dashboard = json.loads(text)
    ids = [p["id"] for p in dashboard["panels"]]
    if len(ids) != len(set(ids)):
        problems.append(f"dashboard: panel ids repeat: {ids}")
    for p in dashboard["panels"]:
        if not p.get("targets") or not all(t.get("expr") for t in p["targets"]):
            problems.append(f"dashboard: panel {p['title']!r} has a target without a PromQL expression")
        exprs += [t.get("expr", "") for t in p.get("targets", [])]
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            exprs.append(v["definition"])

    known = emitted(src)
    read = {base(s) for e in exprs for s in re.findall(r"\bddpm_[a-z_]+", e)}
    for series in sorted(read - known):
        problems.append(f"{series}: read by the dashboard or the rules, emitted nowhere in {src}")
    print("\n".join(problems) if problems else f"{len(read)} series read, all emitted; {len(ids)} panels")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
