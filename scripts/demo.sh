#!/usr/bin/env bash
# `make run`: starts `ddpm-worker serve` in the background on its embedded defaults (SQLite queue and
# a local output directory under $OUT) with MODEL (by default demo/digits-16-labeled, a small committed
# class-conditional model of handwritten digits), then runs a demo job through `submit --wait` and prints
# where its grid PNG is. A class-conditional model's job (its folder has labels.json) spreads its samples
# evenly over the classes, with classifier-free guidance GUIDANCE unless it is empty, and its one grid
# shows every sample, a row per class.
# Calls need a bearer token: $OUT/token holds the demo's (an admin token, made on the first run;
# $OUT/tokens is the server's token file). The server keeps running for grpcurl, the Python
# client and further submits, and serves the web console (http://$LISTEN/console/, log in with the
# demo's token), where the demo job's page shows its grid; `make stop` ends it.
set -euo pipefail
BIN=$1 OUT=$2 MODEL=$3 LISTEN=$4 SCHEDULER=$5 STEPS=$6 SAMPLES=$7 SEED=$8 GUIDANCE=${9:-}
labelled=()
if [ -f "$MODEL/labels.json" ]; then
    labelled=(--samples-per-grid "$SAMPLES")
    [ -z "$GUIDANCE" ] || labelled+=(--guidance-scale "$GUIDANCE")
fi

mkdir -p "$OUT"
if [ ! -s "$OUT/token" ]; then
    (umask 077; od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$OUT/token")
    (umask 077; echo "$(cat "$OUT/token") admin demo" >"$OUT/tokens")
fi
if [ -f "$OUT/serve.pid" ] && kill -0 "$(cat "$OUT/serve.pid")" 2>/dev/null; then
    echo "stopping the previous demo server (pid $(cat "$OUT/serve.pid"))"
    kill -TERM "$(cat "$OUT/serve.pid")"
    while kill -0 "$(cat "$OUT/serve.pid")" 2>/dev/null; do sleep 0.2; done
fi
"$BIN" serve --listen "$LISTEN" --model "demo=$MODEL" --queue "sqlite:$OUT/queue.sqlite" \
    --output "file:$OUT/jobs" --metrics-listen 127.0.0.1:9464 --auth-token-file "$OUT/tokens" --console \
    >"$OUT/serve.out" 2>"$OUT/serve.log" &
echo $! >"$OUT/serve.pid"
for _ in $(seq 1 600); do
    grep -q '^listening on' "$OUT/serve.out" 2>/dev/null && break
    kill -0 "$(cat "$OUT/serve.pid")" 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
    sleep 0.1
done
echo "ddpm-worker serving on $LISTEN (pid $(cat "$OUT/serve.pid"); log: $OUT/serve.log; metrics: http://127.0.0.1:9464/metrics)"
export DDPM_TOKEN_FILE="$OUT/token"
"$BIN" submit --server "http://$LISTEN" --model demo --scheduler "$SCHEDULER" --steps "$STEPS" \
    --num-samples "$SAMPLES" --seed "$SEED" --request-id "demo-$SCHEDULER-$STEPS-$SAMPLES-$SEED-$GUIDANCE" \
    ${labelled[@]+"${labelled[@]}"} --wait \
    | tee "$OUT/demo-job.txt"
# `submit` prints the grid's URI (file:///… for the local output directory); give it as a path to open.
grid=$(sed -n 's|^grid: ||p' "$OUT/demo-job.txt" | head -n 1)
[ -n "$grid" ] || { echo "the demo job printed no grid" >&2; exit 1; }
echo "the demo's grid: ${grid#file://}"
job=$(sed -n 's|^job \([^ ]*\) SUCCEEDED.*|\1|p' "$OUT/demo-job.txt" | head -n 1)
echo "the web console: http://$LISTEN/console/jobs/$job (log in with the demo's token: $(cat "$OUT/token"))"
echo "the server is still running: try \`$BIN list --server http://$LISTEN --token-file $OUT/token\`; stop it with \`make stop\`"
